//! The per-volume state machine: one tokio task per configured volume.
//!
//! `locked → unlocking → serving → suspended → serving` / `→ removed`
//! (docs/AGENT.md "State machine").
//!
//! The decisions are in [`core`], a pure function of (state, event) → (state, effects) with no
//! I/O, tested as tables. This module is the thin async shell around it: it turns timers,
//! commands, worker exits and reloads into [`Event`]s, carries out each [`Effect`] through
//! [`Platform`], and feeds the outcome back. The agent never keeps a volume key: keys live in
//! the worker; the shell holds one only between the unwrap that produced it and the hand-over
//! to a worker (spawn or resume), in a zeroizing [`VolumeKey`] that is dropped at the end of
//! every drive at the latest.
//!
//! A serving worker that dies (crash, SIGKILL) is noticed through
//! [`WorkerPort::watch_worker`](super::ports::WorkerPort::watch_worker) and replaced from `unlocking`: `serving → unlocking → serving` on the same ublk device or,
//! when the platform holds the worker's FUSE connection, the same loop device (both recovered
//! in place), else a new FUSE loop device, with backoff when it keeps dying; a
//! revocation or `kvcrypt lock` meanwhile ends in `suspended` / `locked` without a new worker.

pub mod core;
#[cfg(test)]
mod core_tests;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use kvcrypt_crypto::secmem::VolumeKey;

use self::core::{Clock, Core, DeadProbe, Effect, Event, SUSPEND_TIMEOUT, Want};
pub use self::core::{CloseRefused, Desired};
use super::config::VolumeSettings;
use super::ports::{
    AccessClass, AccessError, Platform, PlatformError, PlatformFailure, RotationReport, Served,
    SlotRef, WorkerExit,
};
use super::status::{VolumeStatus, unix_now};

/// Requests to a volume task (from the control socket, udev attach, shutdown).
#[derive(Debug)]
pub enum Command {
    /// Lock now, as on revocation; stays locked until `Unlock`.
    Lock(oneshot::Sender<Result<String, String>>),
    /// Undo `Lock` (or retry a locked/removed volume now): unwrap again, resume/attach.
    Unlock(oneshot::Sender<Result<String, String>>),
    /// A device appeared or changed (udev ran `kvcrypt attach`): retry now if the volume waits
    /// for its device; otherwise nothing changes (see `Core::wake`).
    Wake,
    /// `kvcrypt close NAME`: close the device (refused while it is mounted or held open) and
    /// keep it closed until `Unlock`. Without this the agent took the closed worker for a
    /// crashed one and served the volume again at once.
    Close(oneshot::Sender<Result<String, CloseRefused>>),
    /// Close the device (flush, remove, wipe) and end the task.
    Shutdown(oneshot::Sender<()>),
}

/// Handle kept by the daemon for one volume task.
#[derive(Debug, Clone)]
pub struct VolumeHandle {
    pub name: String,
    pub tx: mpsc::Sender<Command>,
    pub status: watch::Receiver<VolumeStatus>,
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
    let shell = Shell {
        core: Core::new(settings, runtime, Instant::now(), rand::random()),
        p,
        status_tx,
        rx,
        desired,
        header: None,
        frozen: None,
        key: None,
        exit_watch: None,
        reply: None,
    };
    tokio::spawn(shell.run());
    (VolumeHandle { name, tx, status }, desired_tx)
}

/// Where the answer to the command being handled goes.
enum Reply {
    Text(oneshot::Sender<Result<String, String>>),
    Close(oneshot::Sender<Result<String, CloseRefused>>),
}

impl Reply {
    fn text(self) -> Result<oneshot::Sender<Result<String, String>>, Reply> {
        match self {
            Reply::Text(tx) => Ok(tx),
            other => Err(other),
        }
    }
    fn close(self) -> Result<oneshot::Sender<Result<String, CloseRefused>>, Reply> {
        match self {
            Reply::Close(tx) => Ok(tx),
            other => Err(other),
        }
    }
}

/// Sends `r` on the pending reply channel if it is the kind `pick` takes; a channel of the
/// other kind stays pending (the command that opened it gets its own answer).
fn answer<T>(
    reply: &mut Option<Reply>,
    pick: fn(Reply) -> Result<oneshot::Sender<T>, Reply>,
    r: T,
) {
    match reply.take().map(pick) {
        Some(Ok(tx)) => {
            // The caller may have given up waiting; nothing to do then.
            let _ = tx.send(r);
        }
        Some(Err(other)) => *reply = Some(other),
        None => {}
    }
}

/// The task: the core plus what it must not hold (platform, header, freeze handles, worker
/// watch, the key in flight).
struct Shell<P: Platform> {
    core: Core,
    p: Arc<P>,
    status_tx: watch::Sender<VolumeStatus>,
    rx: mpsc::Receiver<Command>,
    /// Configuration updates (reload).
    desired: watch::Receiver<Desired>,
    /// The header the core's slots came from.
    header: Option<P::Header>,
    /// Handles of the filesystems frozen at suspend (thawed after resume or removal).
    frozen: Option<P::Frozen>,
    /// The key unwrapped for a spawn or resume, until that effect hands it over.
    key: Option<VolumeKey>,
    /// Resolves when the serving worker process ends; armed while serving.
    exit_watch: Option<WorkerExit>,
    reply: Option<Reply>,
}

/// Waits for the armed worker watch (forever when none is armed).
async fn worker_exit(w: &mut Option<WorkerExit>) -> String {
    match w {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

fn clock() -> Clock {
    Clock {
        now: Instant::now(),
        unix: unix_now(),
    }
}

impl<P: Platform> Shell<P> {
    async fn run(mut self) {
        let manual = self.p.manual_lock(&self.core.settings().name);
        self.drive(Event::Start { manual }).await;
        while !self.core.ended() {
            tokio::select! {
                Ok(()) = self.desired.changed() => {
                    let d = self.desired.borrow_and_update().clone();
                    self.drive(Event::Reconfigure(Box::new(d))).await;
                }
                cmd = self.rx.recv() => match cmd {
                    // The daemon went away without asking to close (e.g. `--once`): leave the
                    // worker serving; a later agent adopts it.
                    None => return,
                    Some(Command::Shutdown(done)) => {
                        self.drive(Event::Shutdown).await;
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Lock(tx)) => {
                        self.reply = Some(Reply::Text(tx));
                        self.drive(Event::Lock).await;
                    }
                    Some(Command::Unlock(tx)) => {
                        self.reply = Some(Reply::Text(tx));
                        self.drive(Event::Unlock).await;
                    }
                    Some(Command::Close(tx)) => {
                        self.reply = Some(Reply::Close(tx));
                        self.drive(Event::Close).await;
                    }
                    Some(Command::Wake) => self.drive(Event::Wake).await,
                },
                why = worker_exit(&mut self.exit_watch) => {
                    self.exit_watch = None;
                    self.drive(Event::WorkerExited(why)).await;
                }
                _ = tokio::time::sleep_until(self.core.next()) => self.drive(Event::Tick).await,
            }
        }
    }

    /// Steps the core with `event` and every outcome that follows, until the procedure it
    /// started is over.
    async fn drive(&mut self, event: Event) {
        let mut next = Some(event);
        while let Some(event) = next.take() {
            for effect in self.core.step(event, clock()) {
                if let Some(outcome) = self.carry_out(effect).await {
                    next = Some(outcome);
                }
            }
        }
        // A key unwrapped but not handed over (a failure on the way) goes now.
        self.key = None;
    }

    async fn carry_out(&mut self, effect: Effect) -> Option<Event> {
        let name = self.core.settings().name.clone();
        let p = Arc::clone(&self.p);
        Some(match effect {
            Effect::Publish(st) => {
                self.status_tx.send_replace(*st);
                return None;
            }
            Effect::RememberManual(why) => {
                p.remember_manual(&name, why.as_deref());
                return None;
            }
            Effect::Watch => {
                self.exit_watch = Some(p.watch_worker(&name));
                return None;
            }
            Effect::Unwatch => {
                self.exit_watch = None;
                return None;
            }
            Effect::RepairHeader(dev) => {
                self.repair_header(&dev).await;
                return None;
            }
            Effect::Thaw(bd) => {
                p.thaw(&bd, self.frozen.take()).await;
                return None;
            }
            Effect::ThawHeld(bd) => {
                if let Some(fz) = self.frozen.take() {
                    p.thaw(&bd, Some(fz)).await;
                }
                return None;
            }
            Effect::ForgetFrozen => {
                self.frozen = None;
                return None;
            }
            Effect::DropKey => {
                self.key = None;
                return None;
            }
            Effect::Reply(r) => {
                answer(&mut self.reply, Reply::text, r);
                return None;
            }
            Effect::ReplyClose(r) => {
                answer(&mut self.reply, Reply::close, r);
                return None;
            }
            Effect::End => return None,
            Effect::Adopt => Event::Adopted(p.adopt(&name).await),
            Effect::Locate(selectors) => {
                let mut found = None;
                for sel in &selectors {
                    found = p.locate(sel).await;
                    if found.is_some() {
                        break;
                    }
                }
                Event::Located(found)
            }
            Effect::ReadHeader(dev) => Event::HeaderRead(match p.read_header(&dev).await {
                Ok(h) => {
                    let slots = p.slots(&h);
                    self.header = Some(h);
                    Ok(slots)
                }
                Err(e) => Err(e),
            }),
            Effect::Access {
                slots,
                want,
                timeout,
            } => Event::Access(self.access(slots, want, timeout).await),
            Effect::Spawn { dev, recover } => {
                let Some(key) = self.key.take() else {
                    return Some(Event::Spawned(Err(PlatformError::new(
                        PlatformFailure::Internal,
                        "no unwrapped key to start it with",
                    ))));
                };
                let settings = self.core.settings().clone();
                let r = p.spawn(&settings, &dev, &key, recover).await;
                drop(key);
                Event::Spawned(r)
            }
            Effect::ResumeWorker => {
                let Some(key) = self.key.take() else {
                    return Some(Event::Resumed(Err(PlatformError::new(
                        PlatformFailure::Internal,
                        "no unwrapped key to resume with",
                    ))));
                };
                let r = p.resume(&name, &key).await;
                drop(key);
                Event::Resumed(r)
            }
            Effect::WorkerStatus => Event::WorkerStatus(p.worker_status(&name).await),
            Effect::Suspend { block_device } => {
                self.frozen = Some(p.freeze(&block_device).await);
                Event::Suspended(
                    match tokio::time::timeout(SUSPEND_TIMEOUT, p.suspend(&name)).await {
                        Ok(r) => r,
                        Err(_) => Err(PlatformError::new(
                            PlatformFailure::WorkerControl,
                            format!("no answer within {SUSPEND_TIMEOUT:?}"),
                        )),
                    },
                )
            }
            Effect::Kill => Event::Killed(p.kill_worker(&name).await),
            Effect::Close { force } => Event::Closed(p.close(&name, force).await),
            Effect::ForceRemove { served, suspended } => {
                Event::ForceRemoved(self.force_remove(&served, suspended).await)
            }
            Effect::DeleteUblk(id) => Event::UblkDeleted(p.delete_ublk_device(&name, id).await),
            Effect::RunHook {
                block_device,
                reason,
            } => {
                let settings = self.core.settings().clone();
                Event::HookRan(p.run_hook(&settings, &block_device, &reason).await)
            }
            Effect::Probe { served } => Event::Probed(DeadProbe {
                recoverable: match served.ublk_dev_id {
                    Some(id) => p.ublk_recoverable(id).await,
                    None => false,
                },
                fuse_held: served.ublk_dev_id.is_none() && p.fuse_held(&name),
            }),
            Effect::CleanDeadWorker(served) => {
                Event::Cleaned(p.clean_dead_worker(&name, &served).await)
            }
            Effect::ReleaseFuse(served) => Event::Cleaned(p.release_fuse(&name, &served).await),
            Effect::SystemStopping => Event::SystemStopping(p.system_stopping().await),
            Effect::FollowRotation(dev) => Event::Rotated(self.follow_rotation(&dev).await),
        })
    }

    /// Tries `slots` in order, each within `timeout`, until one works — or, under a split
    /// policy (`all`, `k-of-n`), until the header's threshold of distinct shares has been
    /// granted. For [`Want::Key`] the unwrapped key (rebuilt from the shares under a split
    /// policy) must pass the header's key check, and is then kept for the spawn or resume
    /// that follows.
    async fn access(
        &mut self,
        slots: Vec<SlotRef>,
        want: Want,
        timeout: Duration,
    ) -> Result<Vec<SlotRef>, Vec<AccessError>> {
        let Some(h) = self.header.as_ref() else {
            return Err(vec![AccessError::new(
                AccessClass::Misconfigured,
                "no header",
            )]);
        };
        let need = self.p.threshold(h);
        let mut errors = Vec::new();
        // Split policies: the shares granted so far (x → the unwrapped share for a key,
        // nothing for a proof), and the first slot that granted one.
        let mut granted: Vec<(u8, Option<VolumeKey>)> = Vec::new();
        let mut granting: Vec<SlotRef> = Vec::new();
        for slot in slots {
            let share = slot.share;
            if need > 1 && share.is_some_and(|x| granted.iter().any(|(g, _)| *g == x)) {
                continue; // this share is in hand already (another version of its key)
            }
            let res = match want {
                Want::Key => tokio::time::timeout(timeout, self.p.unwrap_key(&slot))
                    .await
                    .map(|r| {
                        r.and_then(|key| {
                            if need > 1 {
                                // A share is checked once combined: alone it is no key.
                                return Ok(Some(key));
                            }
                            match self.p.verify_key(h, &key) {
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
                            }
                        })
                    }),
                Want::Proof => tokio::time::timeout(timeout, self.p.check_slot(h, &slot))
                    .await
                    .map(|r| r.map(|()| None)),
            };
            match res {
                Err(_) => errors.push((
                    share,
                    AccessError::new(
                        AccessClass::Transient,
                        format!("unwrapKey with {} timed out after {timeout:?}", slot.key_id),
                    ),
                )),
                Ok(Err(e)) => errors.push((share, e)),
                Ok(Ok(key)) if need <= 1 => {
                    self.key = key;
                    return Ok(vec![slot]);
                }
                Ok(Ok(key)) => {
                    granted.push((share.unwrap_or(0), key));
                    granting.push(slot);
                    if granted.len() >= need {
                        break;
                    }
                }
            }
        }
        if need <= 1 {
            return Err(errors.into_iter().map(|(_, e)| e).collect());
        }
        if granted.len() < need {
            return Err(vec![short_of_shares(need, granted.len(), &errors)]);
        }
        if want == Want::Key {
            let shares: Vec<(u8, VolumeKey)> = granted
                .into_iter()
                .filter_map(|(x, k)| k.map(|k| (x, k)))
                .collect();
            match self.p.combine_shares(h, &shares) {
                Ok(key) => self.key = Some(key),
                // Shares that unwrap but do not rebuild this volume's key: never serve with
                // them, and treat it like a denial (as a wrong key is).
                Err(e) => {
                    return Err(vec![AccessError::new(
                        AccessClass::Denied,
                        format!(
                            "the {need} key shares unwrapped do not rebuild the volume's key: {}",
                            e.message
                        ),
                    )]);
                }
            }
        }
        Ok(granting)
    }

    /// A round of rotation following; a header it wrote replaces the one held, and its slots
    /// go to the core.
    async fn follow_rotation(&mut self, dev: &Path) -> Result<RotationReport, PlatformError> {
        let Some(h) = self.header.as_ref() else {
            return Err(PlatformError::new(
                PlatformFailure::Internal,
                "no header held for rotation following",
            ));
        };
        let r = self.p.follow_rotation(dev, h, self.core.settings()).await?;
        let mut report = r.report;
        if let Some(h) = r.header {
            report.slots = Some(self.p.slots(&h));
            self.header = Some(h);
        }
        Ok(report)
    }

    /// A damaged or stale header copy is rewritten once the header has proved authentic (key
    /// check and MAC passed) and before a worker opens the device; it is logged either way, so
    /// a failing disk is noticed rather than found out when the last copy goes.
    async fn repair_header(&mut self, dev: &Path) {
        let Some(h) = self.header.as_ref() else {
            return;
        };
        let name = &self.core.settings().name;
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

    /// Removes the served device whatever its state (revocation: the data must go). A
    /// suspended ublk volume has no worker (it exited, leaving the device QUIESCED), so the
    /// device itself is deleted; otherwise the worker is closed with force.
    async fn force_remove(&mut self, sv: &Served, suspended: bool) -> Result<(), PlatformError> {
        let name = self.core.settings().name.clone();
        if !suspended {
            return self.p.close(&name, true).await.map_err(closing_failed);
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
        let p = &self.p;
        let remove = async {
            match sv.ublk_dev_id {
                Some(id) => p.delete_ublk_device(&name, id).await,
                None => p.close(&name, true).await.map_err(closing_failed),
            }
        };
        let bounded = tokio::time::timeout(Duration::from_secs(30), remove);
        let thaw = p.thaw(&sv.block_device, fz);
        match tokio::join!(bounded, thaw).0 {
            Ok(r) => r,
            Err(_) => Err(PlatformError::new(
                PlatformFailure::Device,
                format!(
                    "{} no longer serves (its I/O fails) but is still held, probably by a mounted filesystem; it goes away once that is unmounted",
                    sv.block_device.display()
                ),
            )),
        }
    }
}

/// Fewer than `need` shares were granted: one error for the state machine. Transient while
/// the shares that failed only transiently could still make up the difference (the volume is
/// not treated as revoked while a threshold could still be reached); denied once that is
/// impossible and some key denied; misconfigured otherwise.
fn short_of_shares(need: usize, got: usize, errors: &[(Option<u8>, AccessError)]) -> AccessError {
    let mut transient: Vec<Option<u8>> = errors
        .iter()
        .filter(|(_, e)| e.class == AccessClass::Transient)
        .map(|(x, _)| *x)
        .collect();
    transient.sort_unstable();
    transient.dedup();
    let class = if got + transient.len() >= need {
        AccessClass::Transient
    } else if errors.iter().any(|(_, e)| e.class == AccessClass::Denied) {
        AccessClass::Denied
    } else {
        AccessClass::Misconfigured
    };
    let reasons: Vec<&str> = errors.iter().map(|(_, e)| e.message.as_str()).collect();
    AccessError::new(
        class,
        format!(
            "{got} of the {need} key shares needed were granted ({})",
            reasons.join("; ")
        ),
    )
}

/// A forced close that failed: the worker did not end as asked.
fn closing_failed(e: super::ports::CloseFailed) -> PlatformError {
    PlatformError::new(PlatformFailure::WorkerControl, e.message)
}
