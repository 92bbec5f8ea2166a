//! The per-volume state machine: one tokio task per configured volume.
//!
//! `locked → unlocking → serving → suspended → serving` / `→ removed`
//! (docs/AGENT.md "State machine").
//! Timers and commands drive it; every side effect goes through [`Platform`]. The agent never
//! keeps a volume key: keys live in the worker; the agent only holds one briefly between
//! unwrap and hand-over (or the key check), in a zeroizing [`VolumeKey`].
//!
//! A serving worker that dies (crash, SIGKILL) is noticed through [`Platform::watch_worker`]
//! and replaced from `unlocking`: `serving → unlocking → serving` on the same ublk device or,
//! when the platform holds the worker's FUSE connection, the same loop device (both recovered
//! in place), else a new FUSE loop device, with backoff when it keeps dying; a
//! revocation or `kvcrypt lock` meanwhile ends in `suspended` / `locked` without a new worker.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use kvcrypt_crypto::secmem::VolumeKey;

use super::backoff::{Backoff, jitter};
use super::config::{RevokePolicy, Selector, VolumeSettings};
use super::ports::{AccessClass, AccessError, CloseFailed, Platform, Served, SlotRef, WorkerExit};
use super::status::{LastError, PolicyView, VolumeState, VolumeStatus, unix_now};

/// What the configuration wants of a volume task; the daemon sends a new value on reload
/// (`systemctl reload`). The task applies it from its next check, without restarting the
/// worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub settings: VolumeSettings,
    /// False once the volume was removed from the configuration file: the task keeps serving
    /// and checking a served device (revocation still applies) until it is closed, but never
    /// unlocks or re-attaches it; then the task ends.
    pub configured: bool,
}

/// Requests to a volume task (from the control socket, udev attach, shutdown).
#[derive(Debug)]
pub enum Command {
    /// Lock now, as on revocation; stays locked until `Unlock`.
    Lock(oneshot::Sender<Result<String, String>>),
    /// Undo `Lock` (or retry a locked/removed volume now): unwrap again, resume/attach.
    Unlock(oneshot::Sender<Result<String, String>>),
    /// A device appeared or changed (udev ran `kvcrypt attach`): retry now if the volume waits
    /// for its device; otherwise nothing changes (see `VolumeCtl::wake`).
    Wake,
    /// `kvcrypt close NAME`: close the device (refused while it is mounted or held open) and
    /// keep it closed until `Unlock`. Without this the agent took the closed worker for a
    /// crashed one and served the volume again at once.
    Close(oneshot::Sender<Result<String, CloseRefused>>),
    /// Close the device (flush, remove, wipe) and end the task.
    Shutdown(oneshot::Sender<()>),
}

/// Why `kvcrypt close` did not close a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseRefused {
    /// Mounted, held open, suspended or being restarted: the operator must act first.
    Busy(String),
    /// Not served: nothing to close.
    NotOpen(String),
    Failed(String),
}

impl std::fmt::Display for CloseRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseRefused::Busy(m) | CloseRefused::NotOpen(m) | CloseRefused::Failed(m) => {
                f.write_str(m)
            }
        }
    }
}

/// Handle kept by the daemon for one volume task.
#[derive(Debug, Clone)]
pub struct VolumeHandle {
    pub name: String,
    pub tx: mpsc::Sender<Command>,
    pub status: watch::Receiver<VolumeStatus>,
}

/// Far enough in the future to mean "no timer".
const IDLE: Duration = Duration::from_secs(86_400 * 365);

/// A worker that served this long before it died was not crash-looping: its death is restarted
/// at once and starts a new backoff sequence. Shorter lives back off (`unlock_retry`).
const STABLE_RUN: Duration = Duration::from_secs(60);

pub struct VolumeCtl<P: Platform> {
    s: VolumeSettings,
    p: Arc<P>,
    status_tx: watch::Sender<VolumeStatus>,
    rx: mpsc::Receiver<Command>,
    state: VolumeState,
    reason: Option<String>,
    header: Option<P::Header>,
    slot: Option<SlotRef>,
    served: Option<Served>,
    frozen: Option<P::Frozen>,
    last_ok: Option<Instant>,
    last_ok_unix: Option<f64>,
    last_error: Option<LastError>,
    suspended_at: Option<Instant>,
    suspended_unix: Option<f64>,
    manual: bool,
    backoff: Backoff,
    next: Instant,
    /// The last unlock attempt failed only because the device was not present: then a wake
    /// (udev saw a device) is news worth retrying at once for. After any other failure it is
    /// not, and the backoff stands.
    waiting_for_device: bool,
    /// The worker was killed because it did not confirm a suspend: resuming starts a new one
    /// (taking over its held device) instead of asking the dead one.
    worker_killed: bool,
    worker: Option<serde_json::Value>,
    rng: StdRng,
    /// Resolves when the serving worker process ends; armed while serving.
    exit_watch: Option<WorkerExit>,
    /// What a worker that died while serving left (for ublk: the QUIESCED device holding the
    /// I/O), until a new worker replaces it or a lock/revocation takes over.
    dead: Option<Served>,
    /// Workers restarted after dying while serving (published).
    restarts: u32,
    /// Deaths in a row, each after less than [`STABLE_RUN`] of serving.
    crash_streak: u32,
    restart_backoff: Backoff,
    serving_since: Option<Instant>,
    /// Configuration updates (reload).
    desired: watch::Receiver<Desired>,
    /// In the configuration file (see [`Desired::configured`]).
    configured: bool,
    /// Handed over by `kvcrypt open` (see [`spawn_runtime`]): `kvcrypt close` ends the task
    /// (the daemon then forgets the volume) instead of keeping it closed until unlock.
    runtime: bool,
    /// The operator's lock/close last recorded with [`Platform::remember_manual`].
    manual_recorded: std::cell::Cell<bool>,
}

/// Waits for the armed worker watch (forever when none is armed).
/// How long a worker may take to confirm a suspend (it waits for in-flight I/O) before it is
/// killed so that its key is gone.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(35);

/// What an access check must produce: the volume key (unlock, resume) or only the proof
/// that access is granted (the periodic check of a serving volume).
#[derive(Clone, Copy)]
enum Want {
    Key,
    Proof,
}

async fn worker_exit(w: &mut Option<WorkerExit>) -> String {
    match w {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Starts the task for one volume (settings fixed for its lifetime).
pub fn spawn_volume<P: Platform>(settings: VolumeSettings, p: Arc<P>) -> VolumeHandle {
    spawn_managed(settings, p).0
}

/// Starts the task for one volume; new settings sent on the returned channel apply from the
/// task's next check. The task ends by itself once it is no longer configured and no longer
/// serves anything (its handle's `tx` is then closed).
pub fn spawn_managed<P: Platform>(
    settings: VolumeSettings,
    p: Arc<P>,
) -> (VolumeHandle, watch::Sender<Desired>) {
    spawn_task(settings, p, false)
}

/// Starts the task of a runtime volume (`kvcrypt open` with the agent running): unlocked,
/// served, checked, restarted and locked exactly like a configured volume; only `kvcrypt
/// close` differs: it closes the device and ends the task, so the volume is forgotten.
pub fn spawn_runtime<P: Platform>(
    settings: VolumeSettings,
    p: Arc<P>,
) -> (VolumeHandle, watch::Sender<Desired>) {
    spawn_task(settings, p, true)
}

fn spawn_task<P: Platform>(
    settings: VolumeSettings,
    p: Arc<P>,
    runtime: bool,
) -> (VolumeHandle, watch::Sender<Desired>) {
    let (desired_tx, desired) = watch::channel(Desired {
        settings: settings.clone(),
        configured: true,
    });
    let (tx, rx) = mpsc::channel(16);
    let (status_tx, status) = watch::channel(VolumeStatus::new(&settings.name));
    let name = settings.name.clone();
    let ctl = VolumeCtl {
        backoff: Backoff::new(settings.unlock_retry.clone()),
        restart_backoff: Backoff::new(settings.unlock_retry.clone()),
        s: settings,
        p,
        status_tx,
        rx,
        state: VolumeState::Locked,
        reason: None,
        header: None,
        slot: None,
        served: None,
        frozen: None,
        last_ok: None,
        last_ok_unix: None,
        last_error: None,
        suspended_at: None,
        suspended_unix: None,
        manual: false,
        next: Instant::now(),
        waiting_for_device: false,
        worker_killed: false,
        worker: None,
        rng: StdRng::from_entropy(),
        exit_watch: None,
        dead: None,
        restarts: 0,
        crash_streak: 0,
        serving_since: None,
        desired,
        configured: true,
        runtime,
        manual_recorded: std::cell::Cell::new(false),
    };
    tokio::spawn(ctl.run());
    (VolumeHandle { name, tx, status }, desired_tx)
}

impl<P: Platform> VolumeCtl<P> {
    async fn run(mut self) {
        self.adopt().await;
        loop {
            if self.finished() {
                if self.runtime {
                    tracing::info!(volume = %self.s.name, state = %self.state,
                        "volume {}: opened by kvcrypt open, now closed ({}); no longer managed",
                        self.s.name, self.state);
                } else {
                    tracing::info!(volume = %self.s.name, state = %self.state,
                        "volume {}: removed from the configuration and no longer served ({}); no longer managed",
                        self.s.name, self.state);
                }
                self.publish();
                return;
            }
            tokio::select! {
                Ok(()) = self.desired.changed() => self.reconfigure(),
                cmd = self.rx.recv() => match cmd {
                    // The daemon went away without asking to close (e.g. `--once`): leave the
                    // worker serving; a later agent adopts it.
                    None => return,
                    Some(Command::Shutdown(done)) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(c) => self.command(c).await,
                },
                why = worker_exit(&mut self.exit_watch) => {
                    self.exit_watch = None;
                    self.worker_died(why).await;
                }
                _ = tokio::time::sleep_until(self.next) => self.tick().await,
            }
        }
    }

    /// Removed from the configuration and nothing left to look after (not served, no device
    /// held by a dead ublk worker, not suspended).
    fn finished(&self) -> bool {
        !self.configured
            && self.served.is_none()
            && self.dead.is_none()
            && matches!(self.state, VolumeState::Locked | VolumeState::Removed)
    }

    /// Applies new settings (reload). The running worker is not touched: policy
    /// (`check_interval`, `hold`, `revoke_policy`, `offline_lock_after`, hook, timeouts, retry)
    /// applies from the next check; the device selector and worker options (transport,
    /// queues, read_only …) apply the next time a worker is started for the volume.
    fn reconfigure(&mut self) {
        let d = self.desired.borrow_and_update().clone();
        if d.settings == self.s && d.configured == self.configured {
            return;
        }
        if d.settings.unlock_retry != self.s.unlock_retry {
            self.backoff = Backoff::new(d.settings.unlock_retry.clone());
            self.restart_backoff = Backoff::new(d.settings.unlock_retry.clone());
        }
        let old_interval = self.s.check_interval;
        self.s = d.settings;
        self.configured = d.configured;
        tracing::info!(volume = %self.s.name, configured = self.configured,
            check_interval = %humantime::format_duration(self.s.check_interval),
            hold = %humantime::format_duration(self.s.hold),
            revoke_policy = ?self.s.revoke_policy,
            "volume {}: settings reloaded (check_interval {}, hold {}, revoke_policy {:?}{})",
            self.s.name,
            humantime::format_duration(self.s.check_interval),
            humantime::format_duration(self.s.hold),
            self.s.revoke_policy,
            if self.configured { "" } else { "; removed from the configuration" });
        // A shorter interval must not wait out the longer one already scheduled.
        if self.s.check_interval < old_interval && !self.manual {
            let sooner = Instant::now() + self.interval();
            if sooner < self.next {
                self.next = sooner;
            }
        }
        self.publish();
    }

    fn interval(&mut self) -> Duration {
        jitter(self.s.check_interval, self.s.check_jitter, &mut self.rng)
    }

    /// Publishes the status; logs one event per state change (no secrets: ids and reasons).
    fn set_state(&mut self, state: VolumeState, reason: Option<String>) {
        let changed = state != self.state || reason != self.reason;
        if changed {
            let key_id = self.slot.as_ref().map(|s| s.key_id.as_str()).unwrap_or("-");
            let why = reason.as_deref().unwrap_or("-");
            // journald shows only the message text (`journalctl -u kvcrypt-agent`): it must
            // say which volume, what it became and why on its own; the fields are for filters.
            let text = match &reason {
                Some(r) => format!("volume {}: {} -> {} ({r})", self.s.name, self.state, state),
                None => format!("volume {}: {} -> {}", self.s.name, self.state, state),
            };
            if state == VolumeState::Unlocking
                || (state == self.state && state != VolumeState::Serving)
            {
                tracing::debug!(volume = %self.s.name, key_id, reason = why, from = %self.state, to = %state, "{text}");
            } else {
                tracing::info!(volume = %self.s.name, key_id, reason = why, from = %self.state, to = %state, "{text}");
            }
        }
        self.state = state;
        self.reason = reason;
        self.publish();
    }

    fn publish(&self) {
        if self.manual != self.manual_recorded.get() {
            let why = self.manual.then(|| self.reason.clone().unwrap_or_default());
            self.p.remember_manual(&self.s.name, why.as_deref());
            self.manual_recorded.set(self.manual);
        }
        // A dead ublk worker's device is still there (QUIESCED, I/O held), and so is a dead
        // FUSE worker's whose connection the platform holds; any other dead FUSE worker's loop
        // device is not worth naming.
        let shown = self.served.as_ref().or(self
            .dead
            .as_ref()
            .filter(|d| d.ublk_dev_id.is_some() || self.p.fuse_held(&self.s.name)));
        let st = VolumeStatus {
            name: self.s.name.clone(),
            state: self.state,
            reason: self.reason.clone(),
            device: shown.map(|s| s.backing.display().to_string()),
            block_device: shown.map(|s| s.block_device.display().to_string()),
            key_id: self.slot.as_ref().map(|s| s.key_id.clone()),
            last_ok: self.last_ok_unix,
            last_error: self.last_error.clone(),
            suspended_at: self.suspended_unix,
            manual: self.manual,
            worker: self.worker.clone(),
            restarts: self.restarts,
            removed_from_config: !self.configured && !self.runtime,
            opened: self.runtime,
            policy: Some(PolicyView::of(&self.s)),
        };
        self.status_tx.send_replace(st);
    }

    fn record_error(&mut self, e: &AccessError) {
        self.last_error = Some(LastError {
            class: e.class,
            message: e.message.clone(),
            at: unix_now() as u64,
        });
    }

    fn record_ok(&mut self) {
        self.last_ok = Some(Instant::now());
        self.last_ok_unix = Some(unix_now());
    }

    /// Takes over a worker left by a previous agent (crash / restart).
    async fn adopt(&mut self) {
        // `kvcrypt lock` / `kvcrypt close` hold until `kvcrypt unlock`, also across an agent
        // restart or crash (not across a reboot: the record lives in /run).
        let manual = self.p.manual_lock(&self.s.name);
        if let Some(why) = &manual {
            self.manual = true;
            self.manual_recorded.set(true);
            self.next = Instant::now() + IDLE;
            self.reason = Some(why.clone());
        }
        let Some(sv) = self.p.adopt(&self.s.name).await else {
            if manual.is_some() {
                tracing::info!(volume = %self.s.name, "volume {}: stays locked ({}) until kvcrypt unlock", self.s.name, self.reason.as_deref().unwrap_or("-"));
            }
            self.publish();
            return;
        };
        tracing::info!(volume = %self.s.name, block_device = %sv.block_device.display(),
            "volume {}: adopting the running worker serving {}{}", self.s.name, sv.block_device.display(),
            if sv.suspended { " (suspended)" } else { "" });
        match self.p.read_header(&sv.backing).await {
            Ok(h) => self.header = Some(h),
            Err(e) => self.record_error(&e),
        }
        if sv.worker_dead {
            // Agent and worker died together (e.g. `systemctl kill`): the worker's FUSE
            // connection survived in systemd's file descriptor store, its I/O waiting. Recover
            // it as if the worker had just died under us.
            let bd = sv.block_device.display().to_string();
            tracing::warn!(volume = %self.s.name, block_device = %bd,
                "volume {}: its worker is dead; its FUSE connection was kept, so I/O on {bd} waits for a new worker to take it over in place", self.s.name);
            self.dead = Some(sv);
            self.record_ok();
            if let Some(why) = manual {
                self.dead_to_locked(why, true).await;
                return;
            }
            self.crash_streak = 1;
            self.next = Instant::now();
            self.set_state(
                VolumeState::Unlocking,
                Some("worker found dead at agent start; taking its device over in place".into()),
            );
            return;
        }
        let suspended = sv.suspended;
        self.served = Some(sv);
        // Counting from now is the conservative choice for offline_lock_after: the previous
        // agent's last check is unknown.
        self.record_ok();
        if suspended {
            self.suspended_at = Some(Instant::now());
            self.suspended_unix = Some(unix_now());
            let why = match &manual {
                Some(m) => format!("adopted a suspended worker; {m}"),
                None => "adopted a suspended worker".into(),
            };
            self.set_state(VolumeState::Suspended, Some(why));
        } else {
            // Serving although recorded as locked (the previous agent died half-way): the
            // running device wins; the record is dropped with the next publish.
            self.manual = false;
            self.arm_watch();
            self.set_state(VolumeState::Serving, Some("adopted running worker".into()));
        }
        self.next = if self.manual {
            Instant::now() + IDLE
        } else {
            Instant::now()
        };
    }

    async fn tick(&mut self) {
        match self.state {
            VolumeState::Locked | VolumeState::Unlocking if self.dead.is_some() => {
                self.recover_worker().await;
            }
            VolumeState::Locked | VolumeState::Unlocking => {
                if self.manual {
                    self.next = Instant::now() + IDLE;
                } else {
                    self.try_unlock().await;
                }
            }
            VolumeState::Removed => {
                if self.manual {
                    self.next = Instant::now() + IDLE;
                } else {
                    self.try_unlock().await;
                }
            }
            VolumeState::Serving => self.check_serving().await,
            VolumeState::Suspended => self.check_suspended().await,
        }
    }

    /// Unwraps the volume key (to unlock or resume) from the slot that worked last, else
    /// from each slot in turn, and checks it against the header's key check. The caller
    /// drops (zeroizes) the key when done.
    async fn check_access(&mut self) -> Result<VolumeKey, AccessError> {
        match self.try_slots(Want::Key).await? {
            Some(key) => Ok(key),
            None => Err(AccessError::new(AccessClass::Misconfigured, "no key")),
        }
    }

    /// Proves that access is still granted without unwrapping the volume key (the periodic
    /// check of a serving volume): the slots' access-check secrets (format v2).
    async fn prove_access(&mut self) -> Result<(), AccessError> {
        self.try_slots(Want::Proof).await.map(drop)
    }

    /// Tries the slot that worked last first, then every other slot until one works: after a
    /// key rotation (`kvcrypt rewrap` added a slot for the new version) a disabled old
    /// version must not lock a volume the new slot still opens.
    async fn try_slots(&mut self, want: Want) -> Result<Option<VolumeKey>, AccessError> {
        if self.header.is_none() {
            let dev = match &self.served {
                Some(s) => s.backing.clone(),
                None => {
                    return Err(AccessError::new(
                        AccessClass::Misconfigured,
                        "no device to read the header from",
                    ));
                }
            };
            self.header = Some(self.p.read_header(&dev).await?);
        }
        let Some(h) = self.header.as_ref() else {
            return Err(AccessError::new(AccessClass::Misconfigured, "no header"));
        };
        let slots = self.p.slots(h);
        if slots.is_empty() {
            return Err(AccessError::new(
                AccessClass::Misconfigured,
                "the volume header has no key slot",
            ));
        }
        // Pinning, before any request: only slots naming a key the configuration pins are
        // tried, and with the pin's host (the disk is not trusted to choose the vault).
        let ids: Vec<&str> = slots.iter().map(|s| s.key_id.as_str()).collect();
        let chosen = self
            .s
            .pins
            .select(&ids)
            .map_err(|e| AccessError::new(AccessClass::NotPinned, e.0))?;
        let mut slots: Vec<SlotRef> = slots
            .into_iter()
            .zip(chosen)
            .filter_map(|(mut slot, id)| match id {
                Some(id) => {
                    slot.key_id = id;
                    Some(slot)
                }
                None => {
                    tracing::debug!(volume = %self.s.name, key_id = %slot.key_id,
                        "volume {}: key slot {} is not pinned; not tried", self.s.name, slot.key_id);
                    None
                }
            })
            .collect();
        if let Some(last) = &self.slot
            && let Some(i) = slots.iter().position(|s| s.key_id == last.key_id)
        {
            let s = slots.remove(i);
            slots.insert(0, s);
        }
        let mut errors: Vec<AccessError> = Vec::new();
        for slot in slots {
            let timeout = self.s.check_timeout;
            let res = match want {
                Want::Key => tokio::time::timeout(timeout, self.p.unwrap_key(&slot))
                    .await
                    .map(|r| {
                        r.and_then(|key| match self.p.verify_key(h, &key) {
                            Ok(()) => Ok(Some(key)),
                            // A key that unwraps but fails the key check is not this
                            // volume's key: never serve with it, and treat it like a denial.
                            Err(e) => Err(AccessError::new(
                                AccessClass::Denied,
                                format!(
                                    "key unwrapped by {} fails the volume's key check: {}",
                                    slot.key_id, e.message
                                ),
                            )),
                        })
                    }),
                Want::Proof => tokio::time::timeout(timeout, self.p.check_slot(h, &slot))
                    .await
                    .map(|r| r.map(|()| None)),
            };
            match res {
                Err(_) => errors.push(AccessError::new(
                    AccessClass::Transient,
                    format!("unwrapKey with {} timed out after {timeout:?}", slot.key_id),
                )),
                Ok(Err(e)) => errors.push(e),
                Ok(Ok(key)) => {
                    if self.slot.as_ref().is_some_and(|s| s.key_id != slot.key_id) {
                        tracing::info!(volume = %self.s.name, key_id = %slot.key_id,
                            "volume {}: key slot {} works; using it from now on", self.s.name, slot.key_id);
                    }
                    self.slot = Some(slot);
                    return Ok(key);
                }
            }
        }
        // With several slots, one transient failure means "maybe later": do not treat the
        // volume as revoked while any slot could still work.
        let class = if errors.iter().any(|e| e.class == AccessClass::Transient) {
            AccessClass::Transient
        } else if errors.iter().any(|e| e.class == AccessClass::Denied) {
            AccessClass::Denied
        } else {
            AccessClass::Misconfigured
        };
        let message = errors
            .iter()
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        Err(AccessError::new(class, message))
    }

    /// locked/removed → unlocking → serving (or back, with a retry scheduled).
    async fn try_unlock(&mut self) -> bool {
        let from = self.state;
        let fail = |ctl: &mut Self, reason: String| {
            let back = if from == VolumeState::Removed {
                VolumeState::Removed
            } else {
                VolumeState::Locked
            };
            // A removed volume waits for restored access: poll it at the check interval.
            // A locked one (boot, absent, vault down) backs off.
            let delay = if back == VolumeState::Removed {
                ctl.interval()
            } else {
                ctl.backoff.next_delay(&mut ctl.rng)
            };
            ctl.next = Instant::now() + delay;
            ctl.set_state(back, Some(reason));
        };
        let Some(dev) = self.p.locate(&self.s.selector).await else {
            let r = format!("device not present ({})", self.s.selector);
            fail(self, r);
            self.waiting_for_device = true;
            return false;
        };
        // Every later outcome (success or a failure with the device present) makes a wake
        // carry no news.
        self.waiting_for_device = false;
        self.set_state(
            VolumeState::Unlocking,
            Some(format!("unlocking {}", dev.display())),
        );
        match self.p.read_header(&dev).await {
            Ok(h) => self.header = Some(h),
            Err(e) => {
                self.record_error(&e);
                fail(self, format!("cannot read header of {}", dev.display()));
                return false;
            }
        }
        self.slot = None;
        let key = match self.check_access().await {
            Ok(k) => k,
            Err(e) => {
                self.record_error(&e);
                if e.class == AccessClass::NotPinned {
                    tracing::error!(volume = %self.s.name, error = %e.message,
                        "volume {}: not unlocked, its key is not pinned: {}", self.s.name, e.message);
                    fail(self, format!("key not pinned: {}", e.message));
                    return false;
                }
                fail(self, format!("cannot unwrap the key ({})", e.class));
                return false;
            }
        };
        self.repair_header(&dev).await;
        let res = self.p.spawn(&self.s, &dev, &key, None).await;
        drop(key);
        match res {
            Ok(sv) => {
                self.served = Some(sv);
                self.arm_watch();
                self.record_ok();
                self.backoff.reset();
                self.manual = false;
                // Re-attached after removal: no longer suspended (status showed the old time).
                self.suspended_at = None;
                self.suspended_unix = None;
                self.next = Instant::now() + self.interval();
                let why = if from == VolumeState::Removed {
                    "access restored, re-attached"
                } else {
                    "unlocked"
                };
                self.set_state(VolumeState::Serving, Some(why.into()));
                true
            }
            Err(msg) => {
                let e = AccessError::new(
                    AccessClass::Transient,
                    format!("cannot start the worker for {}: {msg}", dev.display()),
                );
                self.record_error(&e);
                fail(self, "worker failed to start".into());
                false
            }
        }
    }

    /// A damaged or stale header copy is rewritten once the header has proved authentic (key
    /// check and MAC passed) and before a worker opens the device; it is logged either way, so
    /// a failing disk is noticed rather than found out when the last copy goes.
    async fn repair_header(&mut self, dev: &Path) {
        let Some(h) = self.header.as_ref() else {
            return;
        };
        let name = &self.s.name;
        match self.p.repair_header(dev, h).await {
            Ok(None) => {}
            Ok(Some(what)) => {
                tracing::warn!(volume = %name, device = %dev.display(),
                    "volume {name}: repaired the damaged header copy of {} ({what})", dev.display());
            }
            Err(e) => {
                tracing::error!(volume = %name, device = %dev.display(), error = %e,
                    "volume {name}: a header copy of {} is damaged and could not be repaired: {e}; \
                     save the header now (kvcrypt header backup)", dev.display());
            }
        }
    }

    /// Starts watching the worker that now serves (a new one, or the same one resumed).
    fn arm_watch(&mut self) {
        self.exit_watch = Some(self.p.watch_worker(&self.s.name));
        self.serving_since = Some(Instant::now());
    }

    /// Stops watching: the worker is about to end on purpose (suspend, close).
    fn disarm_watch(&mut self) {
        self.exit_watch = None;
        self.serving_since = None;
    }

    /// The serving worker ended without being asked to (crash, SIGKILL, OOM kill). Its key
    /// died with it. ublk keeps the device (`UBLK_F_USER_RECOVERY | REISSUE`): QUIESCED, I/O
    /// held, to be recovered in place by a new worker. FUSE loses its connection: the loop
    /// device fails I/O, so it is detached and the volume opened again. The first death after
    /// a stable run restarts at once; deaths in a row back off.
    async fn worker_died(&mut self, detail: String) {
        self.exit_watch = None;
        self.worker = None;
        let Some(sv) = self.served.take() else {
            return;
        };
        if !self.configured {
            // Removed from the configuration: its worker ending (`kvcrypt close`, or a crash)
            // ends the agent's care for it; it is not opened again. A ublk device still
            // QUIESCED with I/O held is the exception: dropping it would hang that I/O forever,
            // so it is recovered as usual.
            let held = match sv.ublk_dev_id {
                Some(id) => self.p.ublk_recoverable(id).await,
                None => false,
            };
            if !held {
                let note = if self.p.fuse_held(&self.s.name) {
                    self.p.release_fuse(&self.s.name, &sv).await
                } else {
                    self.p.clean_dead_worker(&self.s.name, &sv).await
                };
                tracing::info!(volume = %self.s.name, block_device = %sv.block_device.display(), cleanup = %note,
                    "volume {}: worker ended ({detail}); the volume is no longer in the configuration, so it is not opened again", self.s.name);
                self.serving_since = None;
                self.set_state(
                    VolumeState::Locked,
                    Some(format!(
                        "worker ended ({detail}); removed from the configuration"
                    )),
                );
                return;
            }
        }
        if self
            .serving_since
            .take()
            .is_some_and(|t| t.elapsed() >= STABLE_RUN)
        {
            self.crash_streak = 0;
            self.restart_backoff.reset();
        }
        self.crash_streak = self.crash_streak.saturating_add(1);
        let delay = if self.crash_streak == 1 {
            Duration::ZERO
        } else {
            self.restart_backoff.next_delay(&mut self.rng)
        };
        let bd = sv.block_device.display().to_string();
        let retry_in = humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
        if sv.ublk_dev_id.is_some() {
            tracing::warn!(volume = %self.s.name, block_device = %bd, crashes_in_a_row = self.crash_streak, %retry_in,
                "volume {}: serving worker died ({detail}); {bd} holds its I/O until a new worker recovers it (restart in {retry_in}, crash {} in a row)",
                self.s.name, self.crash_streak);
        } else if self.p.fuse_held(&self.s.name) {
            let note = self.p.clean_dead_worker(&self.s.name, &sv).await;
            tracing::warn!(volume = %self.s.name, block_device = %bd, crashes_in_a_row = self.crash_streak, %retry_in, cleanup = %note,
                "volume {}: serving worker died ({detail}); its FUSE connection is held, so I/O on {bd} waits for a new worker to take it over in place (restart in {retry_in}, crash {} in a row)",
                self.s.name, self.crash_streak);
        } else {
            let note = self.p.clean_dead_worker(&self.s.name, &sv).await;
            tracing::warn!(volume = %self.s.name, block_device = %bd, crashes_in_a_row = self.crash_streak, %retry_in, cleanup = %note,
                "volume {}: serving worker died ({detail}); in-flight and new I/O on {bd} failed (the FUSE connection died with it); opening the volume again in {retry_in} (crash {} in a row)",
                self.s.name, self.crash_streak);
        }
        self.dead = Some(sv);
        self.next = Instant::now() + delay;
        self.set_state(
            VolumeState::Unlocking,
            Some(format!("worker died ({detail}); restarting in {retry_in}")),
        );
    }

    /// Replaces a dead worker: unwrap the key again (the agent does not keep it), then recover
    /// the same ublk device, or open the volume again (FUSE, or a ublk device that is gone).
    /// A denial (or `offline_lock_after`) on the way ends in suspended/locked, not a worker.
    async fn recover_worker(&mut self) {
        let Some(sv) = self.dead.clone() else {
            return;
        };
        // `kvcrypt open` may have restarted it meanwhile: take that worker over.
        if let Some(live) = self
            .p
            .adopt(&self.s.name)
            .await
            .filter(|l| !l.suspended && !l.worker_dead)
        {
            tracing::info!(volume = %self.s.name, block_device = %live.block_device.display(),
                "volume {}: a new worker serves it already ({}); adopting it", self.s.name, live.block_device.display());
            self.dead = None;
            self.served = Some(live);
            self.arm_watch();
            self.record_ok();
            self.next = Instant::now() + self.interval();
            self.set_state(
                VolumeState::Serving,
                Some("adopted a worker started outside the agent".into()),
            );
            return;
        }
        // The disk itself went away (hot-unplug: the worker closed its device when it noticed,
        // see worker::backing). Nothing to restart until it is back: wait for it like at boot
        // (udev's attach wakes us when it reappears, possibly under another name).
        // The disk it served from first (a cheap check): probing every device would read the
        // held plaintext device too.
        let backing = match self.p.locate(&Selector::Path(sv.backing.clone())).await {
            Some(b) => Some(b),
            None => self.p.locate(&self.s.selector).await,
        };
        let Some(backing) = backing else {
            self.backing_gone(sv).await;
            return;
        };
        let key = match self.check_access().await {
            Ok(k) => k,
            Err(e) => {
                self.record_error(&e);
                let offline = matches!((self.s.offline_lock_after, self.last_ok),
                    (Some(limit), Some(ok)) if ok.elapsed() >= limit);
                if e.class == AccessClass::Denied || offline {
                    let why = if offline {
                        "no successful access check within offline_lock_after".to_owned()
                    } else {
                        format!("access denied: {}", e.message)
                    };
                    tracing::warn!(volume = %self.s.name, reason = %why, "volume {}: not restarting the dead worker: {why}", self.s.name);
                    self.dead_to_locked(format!("{why} (while its worker was down)"), false)
                        .await;
                    return;
                }
                let d = self.restart_backoff.next_delay(&mut self.rng);
                self.next = Instant::now() + d;
                self.set_state(
                    VolumeState::Unlocking,
                    Some(format!(
                        "worker died; cannot unwrap the key to restart it ({}), retrying in {}",
                        e.class,
                        humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
                    )),
                );
                return;
            }
        };
        let bd = sv.block_device.display().to_string();
        let recover = match sv.ublk_dev_id {
            Some(id) if self.p.ublk_recoverable(id).await => Some(id),
            Some(id) => {
                tracing::warn!(volume = %self.s.name, block_device = %bd,
                    "volume {}: ublk device {id} ({bd}) is gone (removed) or no longer recoverable; opening a new device instead (I/O that was queued on it is lost)", self.s.name);
                None
            }
            None => None,
        };
        let res = self.p.spawn(&self.s, &backing, &key, recover).await;
        drop(key);
        match res {
            Ok(new) => {
                self.restarts = self.restarts.saturating_add(1);
                self.dead = None;
                let nb = new.block_device.display().to_string();
                let how = match (recover, sv.ublk_dev_id) {
                    (Some(_), _) => format!("recovered {nb} in place; held I/O resumes"),
                    (None, None) if new.in_place => {
                        format!("recovered {nb} in place; held I/O resumes")
                    }
                    (None, Some(_)) => format!("opened a new device {nb} ({bd} was gone)"),
                    (None, None) => format!("re-opened as {nb} (I/O on {bd} failed meanwhile)"),
                };
                tracing::warn!(volume = %self.s.name, block_device = %nb, restarts = self.restarts, crashes_in_a_row = self.crash_streak,
                    "volume {}: worker restarted after it died: {how}", self.s.name);
                self.served = Some(new);
                self.arm_watch();
                self.record_ok();
                self.next = Instant::now() + self.interval();
                self.set_state(
                    VolumeState::Serving,
                    Some(format!("worker restarted: {how}")),
                );
            }
            Err(msg) => {
                let e = AccessError::new(
                    AccessClass::Transient,
                    format!(
                        "cannot restart the worker for {}: {msg}",
                        sv.backing.display()
                    ),
                );
                self.record_error(&e);
                let d = self.restart_backoff.next_delay(&mut self.rng);
                let retry_in =
                    humantime::format_duration(Duration::from_millis(d.as_millis() as u64));
                tracing::error!(volume = %self.s.name, error = %msg, %retry_in,
                    "volume {}: restarting the dead worker failed: {msg}; retrying in {retry_in}", self.s.name);
                self.next = Instant::now() + d;
                self.set_state(
                    VolumeState::Unlocking,
                    Some("worker died; restarting it failed, retrying".into()),
                );
            }
        }
    }

    /// The backing disk of a dead worker is gone: no worker can serve it. A ublk device still
    /// QUIESCED would hold its I/O forever (nothing can recover it without the disk), so it is
    /// deleted and that I/O fails, as it would on the vanished disk. The volume then waits for
    /// its device, as at boot.
    async fn backing_gone(&mut self, sv: Served) {
        self.dead = None;
        let bd = sv.block_device.display().to_string();
        if sv.ublk_dev_id.is_none() && self.p.fuse_held(&self.s.name) {
            let note = self.p.release_fuse(&self.s.name, &sv).await;
            tracing::info!(volume = %self.s.name, block_device = %bd, cleanup = %note, "volume {}: letting go of the held FUSE connection of {bd}", self.s.name);
        }
        if let Some(id) = sv.ublk_dev_id
            && self.p.ublk_recoverable(id).await
            && let Err(e) = self.p.delete_ublk_device(&self.s.name, id).await
        {
            tracing::error!(volume = %self.s.name, error = %e, "volume {}: deleting {bd} failed: {e}", self.s.name);
        }
        let reason = format!(
            "backing device {} removed; {bd} closed",
            sv.backing.display()
        );
        tracing::warn!(volume = %self.s.name, block_device = %bd, "volume {}: {reason}; waiting for the device", self.s.name);
        self.header = None;
        self.slot = None;
        self.worker = None;
        self.serving_since = None;
        self.crash_streak = 0;
        self.restart_backoff.reset();
        self.backoff.reset();
        self.next = Instant::now() + self.backoff.next_delay(&mut self.rng);
        // As at boot without the disk: a wake (udev attach) retries at once when it is back.
        self.waiting_for_device = true;
        self.set_state(
            VolumeState::Locked,
            Some(format!("device not present ({reason})")),
        );
    }

    /// A revocation, `kvcrypt lock` or the offline limit while the worker is dead: no worker
    /// is started. A ublk device still QUIESCED is exactly a suspended ublk volume (I/O held, no
    /// key anywhere): it becomes `suspended` (resume recovers it, hold expiry deletes it).
    /// Otherwise (FUSE: the device is gone with the worker) the volume is `locked`.
    async fn dead_to_locked(&mut self, reason: String, manual: bool) {
        let Some(sv) = self.dead.take() else {
            return;
        };
        self.manual = manual;
        let held = match sv.ublk_dev_id {
            Some(id) => self.p.ublk_recoverable(id).await,
            None => false,
        };
        if held {
            self.served = Some(sv);
            self.enter_suspended(reason, manual).await;
        } else {
            // A held FUSE connection would keep its I/O waiting for a worker that will not
            // come: let go of it, so that I/O fails as it did before anything was held.
            if sv.ublk_dev_id.is_none() && self.p.fuse_held(&self.s.name) {
                let note = self.p.release_fuse(&self.s.name, &sv).await;
                tracing::info!(volume = %self.s.name, block_device = %sv.block_device.display(), cleanup = %note,
                    "volume {}: not taking over the dead worker's FUSE connection ({reason}); its held I/O fails", self.s.name);
            }
            self.served = None;
            self.next = self.next_check(manual);
            self.set_state(VolumeState::Locked, Some(reason));
        }
    }

    async fn check_serving(&mut self) {
        match self.p.worker_status(&self.s.name).await {
            Ok(v) => self.worker = Some(v),
            Err(e) => {
                // The worker died (killed, crashed) without its exit being noticed (e.g. it
                // could not be watched): its key died with it.
                self.worker_died(format!("worker not answering: {e}")).await;
                return;
            }
        }
        match self.prove_access().await {
            Ok(()) => {
                self.record_ok();
                self.publish();
            }
            Err(e) => {
                self.record_error(&e);
                if e.class == AccessClass::NotPinned {
                    // E.g. a reload removed the pin: a configuration error, not Key Vault's
                    // answer, so no revocation (no freeze, no wipe). Only offline_lock_after,
                    // the operator's limit on time without a successful check, still applies.
                    tracing::error!(volume = %self.s.name, class = %e.class, error = %e.message,
                        "volume {}: access check not made, its key is not pinned (configuration error, not a revocation; the volume keeps serving): {}", self.s.name, e.message);
                } else {
                    tracing::warn!(volume = %self.s.name, class = %e.class, error = %e.message,
                        "volume {}: access check failed ({}): {}", self.s.name, e.class, e.message);
                }
                if e.class == AccessClass::Denied {
                    self.lock(format!("access denied: {}", e.message), false)
                        .await;
                    return;
                }
                if let (Some(limit), Some(ok)) = (self.s.offline_lock_after, self.last_ok)
                    && ok.elapsed() >= limit
                {
                    let r = format!(
                        "no successful access check for {} (offline_lock_after)",
                        humantime::format_duration(Duration::from_secs(ok.elapsed().as_secs()))
                    );
                    self.lock(r, false).await;
                    return;
                }
                self.publish();
            }
        }
        self.next = Instant::now() + self.interval();
    }

    /// serving → suspended (→ removed with policy `remove`): freeze, wipe, hold I/O.
    async fn lock(&mut self, reason: String, manual: bool) {
        self.manual = manual;
        let Some(sv) = self.served.clone() else {
            self.set_state(VolumeState::Locked, Some(reason));
            return;
        };
        // Suspending a ublk worker ends it (and closing any worker does): not a crash.
        self.disarm_watch();
        // Freeze first so everything the filesystem acknowledged is on the device before
        // I/O stops; thaw only after resume (thawing writes the superblock).
        self.frozen = Some(self.p.freeze(&sv.block_device).await);
        let res = match tokio::time::timeout(SUSPEND_TIMEOUT, self.p.suspend(&self.s.name)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {SUSPEND_TIMEOUT:?}")),
        };
        let mut reason = reason;
        if let Err(e) = res {
            // A worker that did not confirm the suspend may still hold the key (wedged, or
            // its answer lost): end it, so the key is gone for certain. Its I/O stays held
            // (ublk: the device goes QUIESCED; FUSE: the agent holds the connection) and the
            // resume path starts a new worker.
            tracing::error!(volume = %self.s.name, error = %e, "volume {}: suspending the worker failed: {e}; killing it", self.s.name);
            let killed = match self.p.kill_worker(&self.s.name).await {
                Ok(how) => {
                    tracing::warn!(volume = %self.s.name, "volume {}: {how}", self.s.name);
                    how
                }
                Err(k) => {
                    tracing::error!(volume = %self.s.name, error = %k, "volume {}: killing the worker failed: {k}", self.s.name);
                    format!("killing it failed: {k}")
                }
            };
            reason = format!("{reason}; suspend failed ({e}), {killed}");
            self.worker_killed = true;
        }
        self.enter_suspended(reason, manual).await;
    }

    /// The key is gone and I/O is held: record when, then apply the revoke policy (`remove`
    /// deletes the device at once; `hold` waits for access to come back).
    async fn enter_suspended(&mut self, reason: String, manual: bool) {
        self.suspended_at = Some(Instant::now());
        self.suspended_unix = Some(unix_now());
        self.set_state(VolumeState::Suspended, Some(reason.clone()));
        if self.s.revoke_policy == RevokePolicy::Remove {
            self.remove(reason).await;
            return;
        }
        self.next = self.next_check(manual);
    }

    /// When to look again at a volume that is not serving: a manual lock waits for
    /// `kvcrypt unlock` (idle), otherwise the normal check interval.
    fn next_check(&mut self, manual: bool) -> Instant {
        if manual {
            Instant::now() + IDLE
        } else {
            Instant::now() + self.interval()
        }
    }

    async fn check_suspended(&mut self) {
        if self.manual {
            self.next = Instant::now() + IDLE;
            return;
        }
        let since = self.suspended_at.unwrap_or_else(Instant::now);
        if self.s.revoke_policy == RevokePolicy::Remove {
            // Switched to `remove` by a reload while suspended.
            self.remove("revoke_policy is remove".into()).await;
            return;
        }
        if since.elapsed() >= self.s.hold {
            let r = format!(
                "access not restored within hold ({})",
                humantime::format_duration(self.s.hold)
            );
            self.remove(r).await;
            return;
        }
        match self.check_access().await {
            Ok(key) => {
                let _ = self.resume(key, "access restored").await;
            }
            Err(e) => {
                self.record_error(&e);
                self.publish();
                let hold_end = since + self.s.hold;
                self.next = (Instant::now() + self.interval()).min(hold_end);
            }
        }
    }

    /// suspended → serving: key back to the worker, then thaw.
    async fn resume(&mut self, key: VolumeKey, why: &str) -> Result<(), String> {
        let res = match self.served.clone() {
            // ublk: suspend ended the worker and left the device QUIESCED with its I/O held
            // (there is no in-process resume); a new worker recovers the same device.
            Some(
                sv @ Served {
                    ublk_dev_id: Some(id),
                    ..
                },
            ) => match self.p.spawn(&self.s, &sv.backing, &key, Some(id)).await {
                Ok(new) => {
                    self.served = Some(new);
                    Ok(())
                }
                Err(e) => Err(format!("recovering ublk device {id}: {e}")),
            },
            // Killed after a failed suspend: a new worker takes over the held device.
            Some(sv) if self.worker_killed => {
                match self.p.spawn(&self.s, &sv.backing, &key, None).await {
                    Ok(new) => {
                        self.served = Some(new);
                        Ok(())
                    }
                    Err(e) => Err(format!("starting a worker after the killed one: {e}")),
                }
            }
            _ => self.p.resume(&self.s.name, &key).await,
        };
        drop(key);
        self.worker_killed = false;
        let bd = self.served.as_ref().map(|s| s.block_device.clone());
        match res {
            Ok(()) => {
                self.arm_watch();
                if let Some(bd) = bd {
                    let fz = self.frozen.take();
                    self.p.thaw(&bd, fz).await;
                }
                self.record_ok();
                self.manual = false;
                self.suspended_at = None;
                self.suspended_unix = None;
                self.next = Instant::now() + self.interval();
                self.set_state(VolumeState::Serving, Some(why.into()));
                Ok(())
            }
            Err(e) => {
                tracing::error!(volume = %self.s.name, error = %e, "volume {}: resuming the worker failed: {e}; re-attaching", self.s.name);
                if let Some(sv) = self.served.clone() {
                    let _ = self.force_remove(&sv, true).await;
                }
                if let Some(bd) = bd {
                    let fz = self.frozen.take();
                    self.p.thaw(&bd, fz).await;
                }
                self.served = None;
                self.next = Instant::now();
                self.set_state(VolumeState::Locked, Some(format!("resume failed: {e}")));
                Err(e)
            }
        }
    }

    /// Removes the served device whatever its state (revocation: the data must go). A
    /// suspended ublk volume has no worker (it exited, leaving the device QUIESCED), so the
    /// device itself is deleted; otherwise the worker is closed with force.
    async fn force_remove(&mut self, sv: &Served, suspended: bool) -> Result<(), String> {
        if !suspended {
            return self
                .p
                .close(&self.s.name, true)
                .await
                .map_err(|e| e.message);
        }
        // A suspended device is torn down with a frozen filesystem on it, held through our
        // freeze handle. Removing it fails the held I/O (ublk: STOP; FUSE: the worker's SIGTERM
        // fails its parked requests), but then waits until nothing holds the device any more
        // (ublk: DEL_DEV waits for the disk's openers; FUSE: the loop device detaches, and the
        // worker's FUSE threads end, only once the filesystem lets go) — and the filesystem
        // lets go only when it is thawed. So the thaw (whose writes now fail fast) runs
        // alongside the removal, not after it: in sequence the two waited for each other (seen
        // in the system test at poweroff: ublk hung, FUSE took the 30 s worker timeout).
        // Bounded: a filesystem still mounted keeps the device until it is unmounted; the
        // device is dead either way.
        let fz = self.frozen.take();
        let remove = async {
            match sv.ublk_dev_id {
                Some(id) => self.p.delete_ublk_device(&self.s.name, id).await,
                None => self
                    .p
                    .close(&self.s.name, true)
                    .await
                    .map_err(|e| e.message),
            }
        };
        let bounded = tokio::time::timeout(Duration::from_secs(30), remove);
        let thaw = self.p.thaw(&sv.block_device, fz);
        match tokio::join!(bounded, thaw).0 {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{} no longer serves (its I/O fails) but is still held, probably by a mounted filesystem; it goes away once that is unmounted",
                sv.block_device.display()
            )),
        }
    }

    /// suspended → removed: hook, then close the device.
    async fn remove(&mut self, reason: String) {
        self.disarm_watch();
        if let Some(sv) = self.served.take() {
            if let Err(e) = self.p.run_hook(&self.s, &sv.block_device, &reason).await {
                tracing::warn!(volume = %self.s.name, error = %e, "volume {}: hook failed: {e}; removing anyway", self.s.name);
            }
            let suspended = self.state == VolumeState::Suspended;
            if let Err(e) = self.force_remove(&sv, suspended).await {
                tracing::error!(volume = %self.s.name, error = %e, "volume {}: closing {} failed: {e}", self.s.name, sv.block_device.display());
            }
            // Thaw after removal only to let a lazily unmounted filesystem go away.
            let fz = self.frozen.take();
            self.p.thaw(&sv.block_device, fz).await;
        }
        self.header = None;
        self.worker = None;
        self.next = self.next_check(self.manual);
        self.set_state(VolumeState::Removed, Some(reason));
    }

    async fn command(&mut self, c: Command) {
        match c {
            Command::Lock(reply) if self.dead.is_some() => {
                self.dead_to_locked("locked by kvcrypt lock".into(), true)
                    .await;
                let _ = reply.send(Ok(format!(
                    "locked ({}; its worker had died and was not restarted)",
                    self.state
                )));
            }
            Command::Unlock(reply) if self.dead.is_some() => {
                self.manual = false;
                self.restart_backoff.reset();
                self.recover_worker().await;
                let res = if self.state == VolumeState::Serving {
                    Ok("worker restarted".to_owned())
                } else {
                    Err(self
                        .reason
                        .clone()
                        .unwrap_or_else(|| "restarting the worker failed".into()))
                };
                let _ = reply.send(res);
            }
            Command::Lock(reply) => {
                let msg = match self.state {
                    VolumeState::Serving => {
                        self.lock("locked by kvcrypt lock".into(), true).await;
                        "locked".to_owned()
                    }
                    VolumeState::Suspended => {
                        self.manual = true;
                        self.next = Instant::now() + IDLE;
                        self.publish();
                        "already suspended; now stays locked until kvcrypt unlock".to_owned()
                    }
                    _ => {
                        self.manual = true;
                        self.next = Instant::now() + IDLE;
                        self.publish();
                        format!(
                            "not served ({}); will not be unlocked until kvcrypt unlock",
                            self.state
                        )
                    }
                };
                let _ = reply.send(Ok(msg));
            }
            Command::Unlock(reply) => {
                self.manual = false;
                let res = match self.state {
                    VolumeState::Serving => Ok("already serving".to_owned()),
                    VolumeState::Suspended => match self.check_access().await {
                        Ok(key) => self
                            .resume(key, "unlocked by kvcrypt unlock")
                            .await
                            .map(|()| "resumed".to_owned()),
                        Err(e) => {
                            self.record_error(&e);
                            self.next = Instant::now() + self.interval();
                            self.publish();
                            Err(format!(
                                "cannot unwrap the key ({}): {}",
                                e.class, e.message
                            ))
                        }
                    },
                    _ => {
                        self.backoff.reset();
                        if self.try_unlock().await {
                            Ok("unlocked".to_owned())
                        } else {
                            let detail = self
                                .last_error
                                .as_ref()
                                .map(|e| format!(": {} ({})", e.message, e.class))
                                .unwrap_or_default();
                            Err(format!(
                                "{}{detail}",
                                self.reason
                                    .clone()
                                    .unwrap_or_else(|| "unlock failed".into())
                            ))
                        }
                    }
                };
                let _ = reply.send(res);
            }
            Command::Wake => self.wake(),
            Command::Close(reply) => {
                let res = self.close_on_request().await;
                let _ = reply.send(res);
            }
            Command::Shutdown(_) => {}
        }
    }

    /// A wake (udev ran `kvcrypt attach` for some device) retries now only if the volume waits
    /// for its device. Anything else the last attempt ran into (header, vault, key check, worker
    /// start) is not fixed by a device event, and such events come in storms: every failed
    /// worker start closes the backing disk it opened for writing, udev's inotify watch turns
    /// that close into a `change` event, and `kvcrypt-attach@` wakes us again — bypassing the
    /// backoff there made a retry loop of about one attempt a second. `kvcrypt unlock` is the
    /// explicit "retry now".
    fn wake(&mut self) {
        let why_not = if self.manual {
            Some("locked by kvcrypt lock")
        } else if !matches!(self.state, VolumeState::Locked | VolumeState::Removed) {
            Some("not waiting for a device")
        } else if !self.waiting_for_device {
            Some("the last attempt did not fail for want of the device; the backoff stands")
        } else {
            None
        };
        match why_not {
            Some(why) => {
                tracing::debug!(volume = %self.s.name, state = %self.state, "volume {}: wake ignored: {why}", self.s.name);
            }
            None => {
                tracing::debug!(volume = %self.s.name, "volume {}: wake: a device appeared; retrying now", self.s.name);
                // The device is new: its failures start a new backoff sequence.
                self.backoff.reset();
                self.next = Instant::now();
            }
        }
    }

    /// `kvcrypt close NAME` through the agent: closes the served device like `kvcrypt close`
    /// does without an agent (refused while mounted or held open) and keeps the volume closed
    /// (`manual`) until `kvcrypt unlock NAME`.
    async fn close_on_request(&mut self) -> Result<String, CloseRefused> {
        let name = self.s.name.clone();
        if self.dead.is_some() {
            return Err(CloseRefused::Busy(format!(
                "its worker died and is being restarted ({}); try again, or kvcrypt lock {name}",
                self.reason.as_deref().unwrap_or("-")
            )));
        }
        match self.state {
            VolumeState::Serving => {}
            VolumeState::Suspended => {
                return Err(CloseRefused::Busy(format!(
                    "suspended (filesystems frozen, I/O held): closing it now would fail that I/O; run kvcrypt unlock {name} first"
                )));
            }
            _ if self.runtime => {
                // Nothing served (revoked and removed, or never unlocked): forget it.
                let was = self.state;
                self.configured = false;
                self.next = Instant::now() + IDLE;
                self.set_state(VolumeState::Locked, Some("closed by kvcrypt close".into()));
                return Ok(format!("was not open ({was}); no longer managed"));
            }
            _ => {
                self.manual = true;
                self.next = Instant::now() + IDLE;
                self.publish();
                return Err(CloseRefused::NotOpen(format!(
                    "not open ({}); it stays closed until kvcrypt unlock {name}",
                    self.state
                )));
            }
        }
        let Some(sv) = self.served.clone() else {
            return Err(CloseRefused::NotOpen("not open".into()));
        };
        // Closing ends the worker on purpose: not a crash to recover from.
        self.disarm_watch();
        match self.p.close(&name, false).await {
            Ok(()) if self.runtime => {
                // Opened by `kvcrypt open`: closing is the end of it. The task ends (see
                // `finished`) and the daemon forgets the volume and its record.
                self.served = None;
                self.worker = None;
                self.header = None;
                self.configured = false;
                self.next = Instant::now() + IDLE;
                self.set_state(VolumeState::Locked, Some("closed by kvcrypt close".into()));
                Ok(format!("closed {}", sv.block_device.display()))
            }
            Ok(()) => {
                self.served = None;
                self.worker = None;
                self.header = None;
                self.manual = true;
                self.next = Instant::now() + IDLE;
                self.set_state(
                    VolumeState::Locked,
                    Some("closed by kvcrypt close; kvcrypt unlock serves it again".into()),
                );
                Ok(format!("closed {}", sv.block_device.display()))
            }
            Err(CloseFailed { busy, message }) => {
                // Still served by the same worker.
                self.arm_watch();
                if busy {
                    Err(CloseRefused::Busy(message))
                } else {
                    Err(CloseRefused::Failed(message))
                }
            }
        }
    }

    async fn shutdown(&mut self) {
        self.disarm_watch();
        // A suspended volume (key gone, I/O held) is left as it is when only the agent stops
        // (`systemctl restart`): the next agent adopts it and resumes it in place. When the
        // whole machine goes down nothing will ever resume it, and its held I/O would hang the
        // shutdown (the final sync waits on it; thawing writes the superblock into it): then
        // the device is removed, the held I/O fails (none of it was acknowledged; the freeze
        // wrote back everything that was), and the filesystem is thawed onto the dead device.
        let suspended = self.state == VolumeState::Suspended;
        let stopping = (suspended || self.dead.is_some()) && self.p.system_stopping().await;
        if let Some(sv) = self.dead.take() {
            let held = match sv.ublk_dev_id {
                Some(id) => self.p.ublk_recoverable(id).await,
                None => false,
            };
            if stopping && held {
                tracing::warn!(volume = %self.s.name, block_device = %sv.block_device.display(),
                    "volume {}: system shutting down with its worker dead: removing {} (its held I/O fails)", self.s.name, sv.block_device.display());
                let _ = self.force_remove(&sv, true).await;
            } else {
                // A dead ublk worker's device stays QUIESCED with its I/O held and its state
                // file in place: the next agent adopts it as suspended and recovers it.
                tracing::warn!(volume = %self.s.name, block_device = %sv.block_device.display(),
                    "volume {}: its worker died and was not restarted before shutdown ({} stays for the next agent)", self.s.name, sv.block_device.display());
            }
        }
        if let Some(sv) = self.served.take() {
            let bd = sv.block_device.display().to_string();
            if suspended && !stopping {
                // Thawing now would block on the held I/O; the next agent thaws after resume.
                tracing::info!(volume = %self.s.name, block_device = %bd,
                    "volume {}: agent stopping while {bd} is suspended: left suspended for the next agent", self.s.name);
                self.frozen = None;
                self.worker = None;
                self.set_state(
                    VolumeState::Suspended,
                    Some("agent stopped; left suspended".into()),
                );
                return;
            }
            if suspended {
                tracing::warn!(volume = %self.s.name, block_device = %bd,
                    "volume {}: system shutting down while suspended: removing {bd} (I/O held since the suspension fails)", self.s.name);
                if let Err(e) = self.force_remove(&sv, true).await {
                    tracing::error!(volume = %self.s.name, error = %e, "volume {}: removing {bd} failed: {e}", self.s.name);
                }
            } else if let Err(e) = self.p.close(&self.s.name, false).await {
                // A device still in use (mounted) is left to its worker, which a later agent
                // adopts: closing it under a mounted filesystem would break that filesystem.
                tracing::warn!(volume = %self.s.name, error = %e, "volume {}: {bd} not closed ({e}); its worker keeps serving", self.s.name);
            }
            if let Some(fz) = self.frozen.take() {
                self.p.thaw(&sv.block_device, Some(fz)).await;
            }
        }
        self.worker = None;
        self.set_state(VolumeState::Locked, Some("agent stopped".into()));
    }
}
