//! The volume state machine without I/O: [`Core::step`] takes the machine's state and one
//! [`Event`] (a timer, an operator's command, a worker's exit, a reload, or the outcome of the
//! last [`Effect`] it asked for) and returns the new state and the effects to carry out.
//!
//! The async shell (`volume/mod.rs`) owns everything that cannot be copied into a table test:
//! the platform, the parsed header, the frozen-filesystem handles, the worker's exit watch and
//! — for the few instants between unwrapKey and the hand-over to a worker — the unwrapped
//! volume key. The core never sees key material: it learns only *which* slot worked.
//!
//! Rules the shell relies on (asserted in [`Core::step`] in tests and debug builds):
//! - an effect that produces an outcome ([`Effect::has_outcome`]) is the last one of a step;
//!   the shell carries out the effects in order and feeds that outcome back at once;
//! - outside events (timer, commands, worker exit, reload) are given only while no procedure
//!   is under way ([`Core::busy`] is false), exactly as the earlier task awaited each procedure
//!   to its end before it looked at its channels again.
//!
//! Logging stays here: each state change and each decision is logged where it is made, with
//! the volume's name in the text (journald shows only the text).

use std::path::PathBuf;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::time::Instant;

use crate::agent::backoff::{Backoff, jitter};
use crate::agent::config::{RevokePolicy, Selector, VolumeSettings};
use crate::agent::ports::{AccessClass, AccessError, CloseFailed, PlatformError, Served, SlotRef};
use crate::agent::status::{LastError, PolicyView, VolumeState, VolumeStatus};

/// Far enough in the future to mean "no timer".
pub const IDLE: Duration = Duration::from_secs(86_400 * 365);

/// A worker that served this long before it died was not crash-looping: its death is restarted
/// at once and starts a new backoff sequence. Shorter lives back off (`unlock_retry`).
pub const STABLE_RUN: Duration = Duration::from_secs(60);

/// How long a worker may take to confirm a suspend (it waits for in-flight I/O) before it is
/// killed so that its key is gone.
pub const SUSPEND_TIMEOUT: Duration = Duration::from_secs(35);

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

/// The time of a step: tokio's clock (paused in tests) and the wall clock for the status.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now: Instant,
    pub unix: f64,
}

/// What an access check must produce: the volume key (unlock, resume) or only the proof
/// that access is granted (the periodic check of a serving volume).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Key,
    Proof,
}

/// What the shell found out about a dead worker's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadProbe {
    /// ublk: the device is still QUIESCED (or LIVE with a dead server), so it can be recovered
    /// in place; its I/O is held. Always false for FUSE.
    pub recoverable: bool,
    /// FUSE: the platform holds the worker's connection, so its I/O waits for a new worker.
    pub fuse_held: bool,
}

/// Inputs of [`Core::step`].
#[derive(Debug)]
pub enum Event {
    /// The task starts; `manual` is what an earlier agent recorded of an operator's lock.
    Start {
        manual: Option<String>,
    },
    /// The timer ([`Core::next`]) expired.
    Tick,
    /// Boxed: settings are large next to every other event.
    Reconfigure(Box<Desired>),
    Lock,
    Unlock,
    Wake,
    Close,
    Shutdown,
    /// The watched worker process ended (pidfd), with a description.
    WorkerExited(String),

    // Outcomes of effects, in the order the effects are listed in [`Effect`].
    Adopted(Option<Served>),
    Located(Option<PathBuf>),
    /// The header was read and parsed (the shell keeps it); its key slots in header order.
    HeaderRead(Result<Vec<SlotRef>, AccessError>),
    /// The slot that worked (for [`Want::Key`] the shell now holds the checked key), or every
    /// slot's error in the order tried.
    Access(Result<SlotRef, Vec<AccessError>>),
    Spawned(Result<Served, PlatformError>),
    Resumed(Result<(), PlatformError>),
    WorkerStatus(Result<serde_json::Value, PlatformError>),
    Suspended(Result<(), PlatformError>),
    Killed(Result<String, PlatformError>),
    Closed(Result<(), CloseFailed>),
    ForceRemoved(Result<(), PlatformError>),
    UblkDeleted(Result<(), PlatformError>),
    HookRan(Result<(), PlatformError>),
    Probed(DeadProbe),
    /// A cleanup's note for the log.
    Cleaned(String),
    SystemStopping(bool),
}

/// Outputs of [`Core::step`], carried out by the shell in order.
#[derive(Debug)]
pub enum Effect {
    // Without an outcome.
    Publish(Box<VolumeStatus>),
    /// Record (`Some`) or clear the operator's lock for the next agent.
    RememberManual(Option<String>),
    /// Watch the worker now serving; its exit becomes [`Event::WorkerExited`].
    Watch,
    /// Stop watching: the worker is about to end on purpose.
    Unwatch,
    /// Rewrite a damaged or stale header copy from the header just proved authentic.
    RepairHeader(PathBuf),
    /// Thaw with the held freeze handles, or every filesystem on the device when none is held.
    Thaw(PathBuf),
    /// Thaw only what the held freeze handles froze, if any.
    ThawHeld(PathBuf),
    /// Let go of the freeze handles without thawing (the next agent thaws after resume).
    ForgetFrozen,
    /// Drop (zeroize) an unwrapped key that will not be handed over.
    DropKey,
    Reply(Result<String, String>),
    ReplyClose(Result<String, CloseRefused>),
    /// The task is over.
    End,

    // With an outcome (the event of the same name).
    /// Find a worker left by an earlier agent → [`Event::Adopted`].
    Adopt,
    /// The first of these selectors that names a present device → [`Event::Located`].
    Locate(Vec<Selector>),
    ReadHeader(PathBuf),
    /// Try `slots` in this order, each within `timeout`; stop at the first that works.
    Access {
        slots: Vec<SlotRef>,
        want: Want,
        timeout: Duration,
    },
    /// Start a worker with the held key (dropped after), recovering ublk device `recover`.
    Spawn {
        dev: PathBuf,
        recover: Option<u32>,
    },
    /// Give the suspended FUSE worker the held key back (dropped after).
    ResumeWorker,
    WorkerStatus,
    /// Freeze the filesystems on `block_device`, then ask the worker to wipe its key within
    /// [`SUSPEND_TIMEOUT`].
    Suspend {
        block_device: PathBuf,
    },
    /// SIGKILL the worker and wait for its exit.
    Kill,
    Close {
        force: bool,
    },
    /// Remove the served device whatever its state (revocation: the data must go).
    ForceRemove {
        served: Served,
        suspended: bool,
    },
    DeleteUblk(u32),
    RunHook {
        block_device: PathBuf,
        reason: String,
    },
    /// What a dead worker left: recoverable ublk device (asked only when `ublk`), held FUSE
    /// connection.
    Probe {
        served: Served,
    },
    CleanDeadWorker(Served),
    ReleaseFuse(Served),
    SystemStopping,
}

impl Effect {
    /// Whether the shell must feed an outcome event back before anything else.
    pub fn has_outcome(&self) -> bool {
        !matches!(
            self,
            Effect::Publish(_)
                | Effect::RememberManual(_)
                | Effect::Watch
                | Effect::Unwatch
                | Effect::RepairHeader(_)
                | Effect::Thaw(_)
                | Effect::ThawHeld(_)
                | Effect::ForgetFrozen
                | Effect::DropKey
                | Effect::Reply(_)
                | Effect::ReplyClose(_)
                | Effect::End
        )
    }
}

/// Where the volume is, with the data that exists only there.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Nothing served (boot, absent device, vault down, closed, locked by the operator).
    Locked,
    /// An unlock is under way (seen only while a procedure runs).
    Unlocking,
    Serving {
        served: Served,
        /// When the watched worker started serving (crash-loop detection).
        since: Instant,
    },
    /// The serving worker died; a new one is to replace it (shown as `unlocking`).
    Restarting {
        dead: Served,
        /// Its device is worth naming in the status: a ublk device holding its I/O, or a FUSE
        /// device whose connection the platform holds.
        shown: bool,
    },
    /// The key is gone, I/O is held, filesystems frozen.
    Suspended {
        served: Served,
        since: Instant,
        /// The worker was killed because it did not confirm the suspend: resuming starts a
        /// new one (taking over its held device) instead of asking the dead one.
        killed: bool,
    },
    /// Removed after a revocation (hook run, device deleted); re-attached when access returns.
    Removed,
    /// The agent stopped; the task ends (shown as `state`, no device).
    Stopped(VolumeState),
}

impl Phase {
    fn state(&self) -> VolumeState {
        match self {
            Phase::Locked => VolumeState::Locked,
            Phase::Unlocking | Phase::Restarting { .. } => VolumeState::Unlocking,
            Phase::Serving { .. } => VolumeState::Serving,
            Phase::Suspended { .. } => VolumeState::Suspended,
            Phase::Removed => VolumeState::Removed,
            Phase::Stopped(s) => *s,
        }
    }
}

/// What the answer to an operator's command depends on, settled when its procedure ends.
#[derive(Debug, Clone, PartialEq)]
enum Pending {
    /// `kvcrypt unlock` of a locked/removed volume: "unlocked" if it ends serving.
    Unlock,
    /// `kvcrypt unlock` while the worker is dead: "worker restarted" if it ends serving.
    UnlockDead,
    /// `kvcrypt unlock` of a suspended volume: the resume's own outcome.
    UnlockSuspended,
    /// `kvcrypt lock` while the worker is dead.
    LockDead,
    /// `kvcrypt lock` of a serving volume.
    Lock,
}

/// What the procedure under way waits for, with what it needs afterwards.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    AdoptFind {
        manual: Option<String>,
    },
    AdoptHeader {
        manual: Option<String>,
        served: Served,
    },
    UnlockLocate {
        from: VolumeState,
    },
    UnlockHeader {
        from: VolumeState,
        dev: PathBuf,
    },
    UnlockSpawn {
        from: VolumeState,
        dev: PathBuf,
    },
    /// An access check: the header (read lazily) or the slots' answers.
    Access {
        want: Want,
        then: AfterAccess,
    },
    CheckStatus,
    LockSuspend {
        reason: String,
        manual: bool,
        served: Served,
    },
    LockKill {
        reason: String,
        manual: bool,
        served: Served,
        error: String,
    },
    RemoveHook {
        reason: String,
        served: Served,
    },
    RemoveForce {
        reason: String,
        served: Served,
    },
    Resume {
        why: String,
        served: Served,
        how: ResumeHow,
    },
    ResumeFailed {
        error: String,
        block_device: PathBuf,
    },
    DiedProbe {
        detail: String,
        served: Served,
        since: Option<Instant>,
    },
    DiedClean {
        detail: String,
        served: Served,
        /// Removed from the configuration: the volume is not opened again.
        unconfigured: bool,
        fuse_held: bool,
        retry_in: String,
        delay: Duration,
    },
    RecoverAdopt {
        dead: Served,
    },
    RecoverLocate {
        dead: Served,
    },
    RecoverProbe {
        dead: Served,
        backing: PathBuf,
    },
    RecoverSpawn {
        dead: Served,
        recover: Option<u32>,
    },
    GoneRelease {
        dead: Served,
    },
    GoneProbe {
        dead: Served,
    },
    GoneDelete {
        dead: Served,
    },
    DeadProbe {
        reason: String,
        manual: bool,
        dead: Served,
    },
    DeadRelease {
        reason: String,
        manual: bool,
    },
    Closing {
        served: Served,
    },
    ShutdownStopping,
    ShutdownDeadProbe {
        stopping: bool,
        dead: Served,
    },
    ShutdownDeadRemove {
        stopping: bool,
    },
    ShutdownServed {
        block_device: PathBuf,
        suspended: bool,
    },
}

/// What follows a successful (or failed) access check.
#[derive(Debug, Clone, PartialEq)]
enum AfterAccess {
    /// Unlock: repair the header, start a worker.
    Unlock { from: VolumeState, dev: PathBuf },
    /// The periodic check of a serving volume.
    CheckServing,
    /// The periodic check of a suspended volume (resume when access is back).
    CheckSuspended { since: Instant },
    /// `kvcrypt unlock` of a suspended volume.
    UnlockSuspended,
    /// Replace a dead worker.
    Recover { dead: Served, backing: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ResumeHow {
    /// A new worker recovers the QUIESCED ublk device.
    Ublk(u32),
    /// A new worker takes over the device the killed worker held.
    AfterKill,
    /// The suspended FUSE worker gets its key back.
    InProcess,
}

/// Health seen by the access checks (published in the status).
#[derive(Debug, Clone, Default)]
struct Health {
    last_ok: Option<Instant>,
    last_ok_unix: Option<f64>,
    last_error: Option<LastError>,
}

/// The volume state machine's whole state.
pub struct Core {
    s: VolumeSettings,
    /// In the configuration file (see [`Desired::configured`]).
    configured: bool,
    /// Handed over by `kvcrypt open`: `kvcrypt close` ends the task (the daemon then forgets
    /// the volume) instead of keeping it closed until unlock.
    runtime: bool,
    phase: Phase,
    /// The state last published (the `from` of the next state-change message).
    shown_state: VolumeState,
    reason: Option<String>,
    /// The key slots of the header the shell holds (`None`: no header read yet).
    slots: Option<Vec<SlotRef>>,
    /// The slot that worked last (tried first; its key id is published).
    slot: Option<SlotRef>,
    health: Health,
    /// Unix time of the last suspension, published until the volume serves again.
    suspended_unix: Option<f64>,
    /// Locked or closed by the operator: stays so until `kvcrypt unlock`.
    manual: bool,
    /// What was last recorded with [`Effect::RememberManual`].
    manual_recorded: bool,
    backoff: Backoff,
    restart_backoff: Backoff,
    rng: StdRng,
    next: Instant,
    /// The last unlock attempt failed only because the device was not present: then a wake
    /// (udev saw a device) is news worth retrying at once for. After any other failure it is
    /// not, and the backoff stands.
    waiting_for_device: bool,
    /// The serving worker's last status (I/O counters).
    worker: Option<serde_json::Value>,
    /// Workers restarted after dying while serving (published).
    restarts: u32,
    /// Deaths in a row, each after less than [`STABLE_RUN`] of serving.
    crash_streak: u32,
    op: Option<Op>,
    pending: Option<Pending>,
    /// The outcome a [`Pending::UnlockSuspended`] answer reports.
    outcome: Option<Result<String, String>>,
    ended: bool,
}

fn short(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

impl Core {
    /// A volume task's state before [`Event::Start`]; `seed` feeds the jitter.
    pub fn new(settings: VolumeSettings, runtime: bool, now: Instant, seed: u64) -> Core {
        Core {
            backoff: Backoff::new(settings.unlock_retry.clone()),
            restart_backoff: Backoff::new(settings.unlock_retry.clone()),
            s: settings,
            configured: true,
            runtime,
            phase: Phase::Locked,
            shown_state: VolumeState::Locked,
            reason: None,
            slots: None,
            slot: None,
            health: Health::default(),
            suspended_unix: None,
            manual: false,
            manual_recorded: false,
            rng: StdRng::seed_from_u64(seed),
            next: now,
            waiting_for_device: false,
            worker: None,
            restarts: 0,
            crash_streak: 0,
            op: None,
            pending: None,
            outcome: None,
            ended: false,
        }
    }

    /// When the next [`Event::Tick`] is due.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// A procedure is under way: only its outcome may be given.
    pub fn busy(&self) -> bool {
        self.op.is_some()
    }

    /// The task is over ([`Effect::End`] was emitted).
    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn state(&self) -> VolumeState {
        self.phase.state()
    }

    pub fn settings(&self) -> &VolumeSettings {
        &self.s
    }

    /// One transition.
    pub fn step(&mut self, event: Event, clock: Clock) -> Vec<Effect> {
        let mut fx = Vec::new();
        let op = self.op.take();
        match op {
            None => self.outside(event, clock, &mut fx),
            Some(op) => self.resume_op(op, event, clock, &mut fx),
        }
        if self.op.is_none() {
            self.settle(&mut fx);
        }
        // The protocol with the shell, checked in every unit test (also in release builds,
        // which is how the test suite runs) and in debug builds.
        if cfg!(any(test, debug_assertions)) {
            assert!(
                fx.iter().rev().skip(1).all(|e| !e.has_outcome()),
                "an effect with an outcome must come last: {fx:?}"
            );
            assert_eq!(
                self.op.is_some(),
                fx.last().is_some_and(Effect::has_outcome),
                "a procedure waits exactly when its last effect has an outcome: {fx:?}"
            );
        }
        fx
    }

    /// A procedure just ended: answer the command that started it; end the task if nothing
    /// is left to look after.
    fn settle(&mut self, fx: &mut Vec<Effect>) {
        let outcome = self.outcome.take();
        if let Some(p) = self.pending.take() {
            let serving = self.phase.state() == VolumeState::Serving;
            let answer = match p {
                Pending::Unlock if serving => Ok("unlocked".to_owned()),
                Pending::Unlock => {
                    let detail = self
                        .health
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
                Pending::UnlockDead if serving => Ok("worker restarted".to_owned()),
                Pending::UnlockDead => Err(self
                    .reason
                    .clone()
                    .unwrap_or_else(|| "restarting the worker failed".into())),
                Pending::UnlockSuspended => outcome.unwrap_or_else(|| Err("resume failed".into())),
                Pending::LockDead => Ok(format!(
                    "locked ({}; its worker had died and was not restarted)",
                    self.phase.state()
                )),
                Pending::Lock => Ok("locked".to_owned()),
            };
            fx.push(Effect::Reply(answer));
        }
        if !self.ended && self.finished() {
            if self.runtime {
                tracing::info!(volume = %self.s.name, state = %self.phase.state(),
                    "volume {}: opened by kvcrypt open, now closed ({}); no longer managed",
                    self.s.name, self.phase.state());
            } else {
                tracing::info!(volume = %self.s.name, state = %self.phase.state(),
                    "volume {}: removed from the configuration and no longer served ({}); no longer managed",
                    self.s.name, self.phase.state());
            }
            self.publish(fx);
            self.ended = true;
            fx.push(Effect::End);
        }
    }

    /// Removed from the configuration and nothing left to look after (not served, no device
    /// held by a dead ublk worker, not suspended).
    fn finished(&self) -> bool {
        !self.configured && matches!(self.phase, Phase::Locked | Phase::Removed)
    }

    fn interval(&mut self) -> Duration {
        jitter(self.s.check_interval, self.s.check_jitter, &mut self.rng)
    }

    /// When to look again at a volume that is not serving: a manual lock waits for
    /// `kvcrypt unlock` (idle), otherwise the normal check interval.
    fn next_check(&mut self, manual: bool, now: Instant) -> Instant {
        if manual {
            now + IDLE
        } else {
            now + self.interval()
        }
    }

    /// Publishes the status; logs one event per state change (no secrets: ids and reasons).
    fn set_state(&mut self, reason: Option<String>, fx: &mut Vec<Effect>) {
        let state = self.phase.state();
        let from = self.shown_state;
        if state != from || reason != self.reason {
            let key_id = self.slot.as_ref().map(|s| s.key_id.as_str()).unwrap_or("-");
            let why = reason.as_deref().unwrap_or("-");
            // journald shows only the message text (`journalctl -u kvcrypt-agent`): it must
            // say which volume, what it became and why on its own; the fields are for filters.
            let text = match &reason {
                Some(r) => format!("volume {}: {from} -> {state} ({r})", self.s.name),
                None => format!("volume {}: {from} -> {state}", self.s.name),
            };
            if state == VolumeState::Unlocking || (state == from && state != VolumeState::Serving) {
                tracing::debug!(volume = %self.s.name, key_id, reason = why, from = %from, to = %state, "{text}");
            } else {
                tracing::info!(volume = %self.s.name, key_id, reason = why, from = %from, to = %state, "{text}");
            }
        }
        self.shown_state = state;
        self.reason = reason;
        self.publish(fx);
    }

    fn publish(&mut self, fx: &mut Vec<Effect>) {
        if self.manual != self.manual_recorded {
            let why = self.manual.then(|| self.reason.clone().unwrap_or_default());
            fx.push(Effect::RememberManual(why));
            self.manual_recorded = self.manual;
        }
        // A dead ublk worker's device is still there (QUIESCED, I/O held), and so is a dead
        // FUSE worker's whose connection the platform holds; any other dead FUSE worker's loop
        // device is not worth naming.
        let shown = match &self.phase {
            Phase::Serving { served, .. } | Phase::Suspended { served, .. } => Some(served),
            Phase::Restarting { dead, shown: true } => Some(dead),
            _ => None,
        };
        fx.push(Effect::Publish(Box::new(VolumeStatus {
            name: self.s.name.clone(),
            state: self.shown_state,
            reason: self.reason.clone(),
            device: shown.map(|s| s.backing.display().to_string()),
            block_device: shown.map(|s| s.block_device.display().to_string()),
            key_id: self.slot.as_ref().map(|s| s.key_id.clone()),
            last_ok: self.health.last_ok_unix,
            last_error: self.health.last_error.clone(),
            suspended_at: self.suspended_unix,
            manual: self.manual,
            worker: self.worker.clone(),
            restarts: self.restarts,
            removed_from_config: !self.configured && !self.runtime,
            opened: self.runtime,
            policy: Some(PolicyView::of(&self.s)),
        })));
    }

    fn record_error(&mut self, e: &AccessError, clock: Clock) {
        self.health.last_error = Some(LastError {
            class: e.class,
            message: e.message.clone(),
            at: clock.unix as u64,
        });
    }

    fn record_ok(&mut self, clock: Clock) {
        self.health.last_ok = Some(clock.now);
        self.health.last_ok_unix = Some(clock.unix);
    }

    /// Starts watching the worker that now serves (a new one, or the same one resumed).
    fn serve(&mut self, served: Served, clock: Clock, fx: &mut Vec<Effect>) {
        fx.push(Effect::Watch);
        self.phase = Phase::Serving {
            served,
            since: clock.now,
        };
    }

    /// `offline_lock_after` passed since the last successful check.
    fn offline_too_long(&self, now: Instant) -> bool {
        matches!((self.s.offline_lock_after, self.health.last_ok),
            (Some(limit), Some(ok)) if now.saturating_duration_since(ok) >= limit)
    }

    // ---- outside events -------------------------------------------------------------------

    fn outside(&mut self, event: Event, clock: Clock, fx: &mut Vec<Effect>) {
        match event {
            Event::Start { manual } => self.start(manual, clock, fx),
            Event::Reconfigure(d) => self.reconfigure(*d, clock, fx),
            Event::Tick => self.tick(clock, fx),
            Event::WorkerExited(why) => self.worker_died(why, clock, fx),
            Event::Lock => self.lock_command(clock, fx),
            Event::Unlock => self.unlock_command(clock, fx),
            Event::Wake => self.wake(clock),
            Event::Close => self.close_command(clock, fx),
            Event::Shutdown => self.shutdown(fx),
            other => {
                if cfg!(any(test, debug_assertions)) {
                    panic!("outcome {other:?} with no procedure under way");
                }
                tracing::error!(volume = %self.s.name, "volume {}: internal error: outcome {other:?} with no procedure under way; ignored", self.s.name);
            }
        }
    }

    /// Takes over a worker left by a previous agent (crash / restart).
    fn start(&mut self, manual: Option<String>, clock: Clock, fx: &mut Vec<Effect>) {
        // `kvcrypt lock` / `kvcrypt close` hold until `kvcrypt unlock`, also across an agent
        // restart or crash (not across a reboot: the record lives in /run).
        if let Some(why) = &manual {
            self.manual = true;
            self.manual_recorded = true;
            self.next = clock.now + IDLE;
            self.reason = Some(why.clone());
        }
        self.op = Some(Op::AdoptFind { manual });
        fx.push(Effect::Adopt);
    }

    /// Applies new settings (reload). The running worker is not touched: policy
    /// (`check_interval`, `hold`, `revoke_policy`, `offline_lock_after`, hook, timeouts, retry)
    /// applies from the next check; the device selector and worker options (transport,
    /// queues, read_only …) apply the next time a worker is started for the volume.
    fn reconfigure(&mut self, d: Desired, clock: Clock, fx: &mut Vec<Effect>) {
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
            let sooner = clock.now + self.interval();
            if sooner < self.next {
                self.next = sooner;
            }
        }
        self.publish(fx);
    }

    fn tick(&mut self, clock: Clock, fx: &mut Vec<Effect>) {
        match &self.phase {
            Phase::Restarting { dead, .. } => {
                let dead = dead.clone();
                self.recover_worker(dead, fx);
            }
            Phase::Locked | Phase::Unlocking | Phase::Removed => {
                if self.manual {
                    self.next = clock.now + IDLE;
                } else {
                    self.try_unlock(fx);
                }
            }
            Phase::Serving { .. } => {
                self.op = Some(Op::CheckStatus);
                fx.push(Effect::WorkerStatus);
            }
            Phase::Suspended { since, .. } => {
                let since = *since;
                self.check_suspended(since, clock, fx);
            }
            Phase::Stopped(_) => {}
        }
    }

    fn lock_command(&mut self, clock: Clock, fx: &mut Vec<Effect>) {
        match &self.phase {
            Phase::Restarting { .. } => {
                self.pending = Some(Pending::LockDead);
                self.dead_to_locked("locked by kvcrypt lock".into(), true, clock, fx);
            }
            Phase::Serving { .. } => {
                self.pending = Some(Pending::Lock);
                self.lock("locked by kvcrypt lock".into(), true, clock, fx);
            }
            Phase::Suspended { .. } => {
                self.manual = true;
                self.next = clock.now + IDLE;
                self.publish(fx);
                fx.push(Effect::Reply(Ok(
                    "already suspended; now stays locked until kvcrypt unlock".to_owned(),
                )));
            }
            _ => {
                self.manual = true;
                self.next = clock.now + IDLE;
                self.publish(fx);
                fx.push(Effect::Reply(Ok(format!(
                    "not served ({}); will not be unlocked until kvcrypt unlock",
                    self.phase.state()
                ))));
            }
        }
    }

    fn unlock_command(&mut self, clock: Clock, fx: &mut Vec<Effect>) {
        self.manual = false;
        match &self.phase {
            Phase::Restarting { dead, .. } => {
                let dead = dead.clone();
                self.restart_backoff.reset();
                self.pending = Some(Pending::UnlockDead);
                self.recover_worker(dead, fx);
            }
            Phase::Serving { .. } => fx.push(Effect::Reply(Ok("already serving".to_owned()))),
            Phase::Suspended { .. } => {
                self.pending = Some(Pending::UnlockSuspended);
                self.access(Want::Key, AfterAccess::UnlockSuspended, clock, fx);
            }
            _ => {
                self.backoff.reset();
                self.pending = Some(Pending::Unlock);
                self.try_unlock(fx);
            }
        }
    }

    /// A wake (udev ran `kvcrypt attach` for some device) retries now only if the volume waits
    /// for its device. Anything else the last attempt ran into (header, vault, key check, worker
    /// start) is not fixed by a device event, and such events come in storms: every failed
    /// worker start closes the backing disk it opened for writing, udev's inotify watch turns
    /// that close into a `change` event, and `kvcrypt-attach@` wakes us again — bypassing the
    /// backoff there made a retry loop of about one attempt a second. `kvcrypt unlock` is the
    /// explicit "retry now".
    fn wake(&mut self, clock: Clock) {
        let why_not = if self.manual {
            Some("locked by kvcrypt lock")
        } else if !matches!(self.phase, Phase::Locked | Phase::Removed) {
            Some("not waiting for a device")
        } else if !self.waiting_for_device {
            Some("the last attempt did not fail for want of the device; the backoff stands")
        } else {
            None
        };
        match why_not {
            Some(why) => {
                tracing::debug!(volume = %self.s.name, state = %self.phase.state(), "volume {}: wake ignored: {why}", self.s.name);
            }
            None => {
                tracing::debug!(volume = %self.s.name, "volume {}: wake: a device appeared; retrying now", self.s.name);
                // The device is new: its failures start a new backoff sequence.
                self.backoff.reset();
                self.next = clock.now;
            }
        }
    }

    /// `kvcrypt close NAME` through the agent: closes the served device like `kvcrypt close`
    /// does without an agent (refused while mounted or held open) and keeps the volume closed
    /// (`manual`) until `kvcrypt unlock NAME`.
    fn close_command(&mut self, clock: Clock, fx: &mut Vec<Effect>) {
        let name = self.s.name.clone();
        let refuse = |fx: &mut Vec<Effect>, r: CloseRefused| fx.push(Effect::ReplyClose(Err(r)));
        match &self.phase {
            Phase::Restarting { .. } => refuse(
                fx,
                CloseRefused::Busy(format!(
                    "its worker died and is being restarted ({}); try again, or kvcrypt lock {name}",
                    self.reason.as_deref().unwrap_or("-")
                )),
            ),
            Phase::Serving { served, .. } => {
                let served = served.clone();
                // Closing ends the worker on purpose: not a crash to recover from.
                fx.push(Effect::Unwatch);
                self.op = Some(Op::Closing { served });
                fx.push(Effect::Close { force: false });
            }
            Phase::Suspended { .. } => refuse(
                fx,
                CloseRefused::Busy(format!(
                    "suspended (filesystems frozen, I/O held): closing it now would fail that I/O; run kvcrypt unlock {name} first"
                )),
            ),
            _ if self.runtime => {
                // Nothing served (revoked and removed, or never unlocked): forget it.
                let was = self.phase.state();
                self.configured = false;
                self.next = clock.now + IDLE;
                self.phase = Phase::Locked;
                self.set_state(Some("closed by kvcrypt close".into()), fx);
                fx.push(Effect::ReplyClose(Ok(format!(
                    "was not open ({was}); no longer managed"
                ))));
            }
            _ => {
                self.manual = true;
                self.next = clock.now + IDLE;
                self.publish(fx);
                refuse(
                    fx,
                    CloseRefused::NotOpen(format!(
                        "not open ({}); it stays closed until kvcrypt unlock {name}",
                        self.phase.state()
                    )),
                );
            }
        }
    }

    fn closed(
        &mut self,
        served: Served,
        r: Result<(), CloseFailed>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        let bd = served.block_device.display().to_string();
        match r {
            Ok(()) => {
                self.worker = None;
                self.slots = None;
                self.next = clock.now + IDLE;
                self.phase = Phase::Locked;
                if self.runtime {
                    // Opened by `kvcrypt open`: closing is the end of it. The task ends (see
                    // `finished`) and the daemon forgets the volume and its record.
                    self.configured = false;
                    self.set_state(Some("closed by kvcrypt close".into()), fx);
                } else {
                    self.manual = true;
                    self.set_state(
                        Some("closed by kvcrypt close; kvcrypt unlock serves it again".into()),
                        fx,
                    );
                }
                fx.push(Effect::ReplyClose(Ok(format!("closed {bd}"))));
            }
            Err(CloseFailed { busy, message }) => {
                // Still served by the same worker.
                self.serve(served, clock, fx);
                fx.push(Effect::ReplyClose(Err(if busy {
                    CloseRefused::Busy(message)
                } else {
                    CloseRefused::Failed(message)
                })));
            }
        }
    }

    // ---- procedures -----------------------------------------------------------------------

    /// Continues the procedure `op` with the outcome `event` of its last effect.
    fn resume_op(&mut self, op: Op, event: Event, clock: Clock, fx: &mut Vec<Effect>) {
        match (op, event) {
            (Op::AdoptFind { manual }, Event::Adopted(found)) => {
                self.adopt_found(manual, found, fx)
            }
            (Op::AdoptHeader { manual, served }, Event::HeaderRead(r)) => {
                match r {
                    Ok(slots) => self.slots = Some(slots),
                    Err(e) => self.record_error(&e, clock),
                }
                self.adopt(manual, served, clock, fx);
            }
            (Op::UnlockLocate { from }, Event::Located(found)) => {
                self.unlock_located(from, found, clock, fx)
            }
            (Op::UnlockHeader { from, dev }, Event::HeaderRead(r)) => match r {
                Ok(slots) => {
                    self.slots = Some(slots);
                    self.slot = None;
                    self.access(Want::Key, AfterAccess::Unlock { from, dev }, clock, fx);
                }
                Err(e) => {
                    self.record_error(&e, clock);
                    self.unlock_failed(
                        from,
                        format!("cannot read header of {}", dev.display()),
                        clock,
                        fx,
                    );
                }
            },
            (Op::UnlockSpawn { from, dev }, Event::Spawned(r)) => {
                self.unlock_spawned(from, dev, r, clock, fx)
            }
            (Op::Access { want, then }, Event::HeaderRead(r)) => match r {
                Ok(slots) => {
                    self.slots = Some(slots);
                    self.access(want, then, clock, fx);
                }
                Err(e) => self.accessed(then, Err(e), clock, fx),
            },
            (Op::Access { want: _, then }, Event::Access(r)) => {
                let r = r.map_err(|errors| combine(&errors));
                if let Ok(slot) = &r {
                    if self.slot.as_ref().is_some_and(|s| s.key_id != slot.key_id) {
                        tracing::info!(volume = %self.s.name, key_id = %slot.key_id,
                            "volume {}: key slot {} works; using it from now on", self.s.name, slot.key_id);
                    }
                    self.slot = Some(slot.clone());
                }
                self.accessed(then, r.map(drop), clock, fx);
            }
            (Op::CheckStatus, Event::WorkerStatus(r)) => match r {
                Ok(v) => {
                    self.worker = Some(v);
                    self.access(Want::Proof, AfterAccess::CheckServing, clock, fx);
                }
                // The worker died (killed, crashed) without its exit being noticed (e.g. it
                // could not be watched): its key died with it.
                Err(e) => self.worker_died(format!("worker not answering: {e}"), clock, fx),
            },
            (
                Op::LockSuspend {
                    reason,
                    manual,
                    served,
                },
                Event::Suspended(r),
            ) => match r {
                Ok(()) => self.enter_suspended(served, reason, manual, false, clock, fx),
                Err(e) => {
                    // A worker that did not confirm the suspend may still hold the key
                    // (wedged, or its answer lost): end it, so the key is gone for certain.
                    // Its I/O stays held (ublk: the device goes QUIESCED; FUSE: the agent
                    // holds the connection) and the resume path starts a new worker.
                    tracing::error!(volume = %self.s.name, error = %e, "volume {}: suspending the worker failed: {e}; killing it", self.s.name);
                    self.op = Some(Op::LockKill {
                        reason,
                        manual,
                        served,
                        error: e.message,
                    });
                    fx.push(Effect::Kill);
                }
            },
            (
                Op::LockKill {
                    reason,
                    manual,
                    served,
                    error,
                },
                Event::Killed(r),
            ) => {
                let killed = match r {
                    Ok(how) => {
                        tracing::warn!(volume = %self.s.name, "volume {}: {how}", self.s.name);
                        how
                    }
                    Err(k) => {
                        tracing::error!(volume = %self.s.name, error = %k, "volume {}: killing the worker failed: {k}", self.s.name);
                        format!("killing it failed: {k}")
                    }
                };
                let reason = format!("{reason}; suspend failed ({error}), {killed}");
                self.enter_suspended(served, reason, manual, true, clock, fx);
            }
            (Op::RemoveHook { reason, served }, Event::HookRan(r)) => {
                if let Err(e) = r {
                    tracing::warn!(volume = %self.s.name, error = %e, "volume {}: hook failed: {e}; removing anyway", self.s.name);
                }
                self.op = Some(Op::RemoveForce {
                    reason,
                    served: served.clone(),
                });
                fx.push(Effect::ForceRemove {
                    served,
                    suspended: true,
                });
            }
            (Op::RemoveForce { reason, served }, Event::ForceRemoved(r)) => {
                if let Err(e) = r {
                    tracing::error!(volume = %self.s.name, error = %e, "volume {}: closing {} failed: {e}", self.s.name, served.block_device.display());
                }
                // Thaw after removal only to let a lazily unmounted filesystem go away.
                fx.push(Effect::Thaw(served.block_device.clone()));
                self.removed(reason, clock, fx);
            }
            (Op::Resume { why, served, how }, Event::Spawned(r)) => {
                let r = match r {
                    Ok(new) => Ok(new),
                    Err(e) => Err(match how {
                        ResumeHow::Ublk(id) => format!("recovering ublk device {id}: {e}"),
                        _ => format!("starting a worker after the killed one: {e}"),
                    }),
                };
                self.resumed(why, served, r, clock, fx);
            }
            (Op::Resume { why, served, .. }, Event::Resumed(r)) => {
                let r = r.map(|()| served.clone()).map_err(|e| e.message);
                self.resumed(why, served, r, clock, fx);
            }
            (
                Op::ResumeFailed {
                    error,
                    block_device,
                },
                Event::ForceRemoved(_),
            ) => {
                fx.push(Effect::Thaw(block_device));
                self.phase = Phase::Locked;
                self.next = clock.now;
                self.set_state(Some(format!("resume failed: {error}")), fx);
            }
            (
                Op::DiedProbe {
                    detail,
                    served,
                    since,
                },
                Event::Probed(p),
            ) => self.died_probed(detail, served, since, p, clock, fx),
            (
                Op::DiedClean {
                    detail,
                    served,
                    unconfigured,
                    fuse_held,
                    retry_in,
                    delay,
                },
                Event::Cleaned(note),
            ) => {
                let bd = served.block_device.display().to_string();
                if unconfigured {
                    tracing::info!(volume = %self.s.name, block_device = %bd, cleanup = %note,
                        "volume {}: worker ended ({detail}); the volume is no longer in the configuration, so it is not opened again", self.s.name);
                    self.phase = Phase::Locked;
                    self.set_state(
                        Some(format!(
                            "worker ended ({detail}); removed from the configuration"
                        )),
                        fx,
                    );
                    return;
                }
                if fuse_held {
                    tracing::warn!(volume = %self.s.name, block_device = %bd, crashes_in_a_row = self.crash_streak, %retry_in, cleanup = %note,
                        "volume {}: serving worker died ({detail}); its FUSE connection is held, so I/O on {bd} waits for a new worker to take it over in place (restart in {retry_in}, crash {} in a row)",
                        self.s.name, self.crash_streak);
                } else {
                    tracing::warn!(volume = %self.s.name, block_device = %bd, crashes_in_a_row = self.crash_streak, %retry_in, cleanup = %note,
                        "volume {}: serving worker died ({detail}); in-flight and new I/O on {bd} failed (the FUSE connection died with it); opening the volume again in {retry_in} (crash {} in a row)",
                        self.s.name, self.crash_streak);
                }
                self.restart_later(served, fuse_held, detail, retry_in, delay, clock, fx);
            }
            (Op::RecoverAdopt { dead }, Event::Adopted(live)) => {
                // `kvcrypt open` may have restarted it meanwhile: take that worker over.
                match live.filter(|l| !l.suspended && !l.worker_dead) {
                    Some(live) => {
                        tracing::info!(volume = %self.s.name, block_device = %live.block_device.display(),
                            "volume {}: a new worker serves it already ({}); adopting it", self.s.name, live.block_device.display());
                        self.serve(live, clock, fx);
                        self.record_ok(clock);
                        self.next = clock.now + self.interval();
                        self.set_state(
                            Some("adopted a worker started outside the agent".into()),
                            fx,
                        );
                    }
                    None => {
                        // The disk itself went away (hot-unplug: the worker closed its device
                        // when it noticed, see worker::backing). Nothing to restart until it
                        // is back: wait for it like at boot (udev's attach wakes us when it
                        // reappears, possibly under another name). The disk it served from
                        // first (a cheap check): probing every device would read the held
                        // plaintext device too.
                        let sels = vec![
                            Selector::Path(dead.backing.clone()),
                            self.s.selector.clone(),
                        ];
                        self.op = Some(Op::RecoverLocate { dead });
                        fx.push(Effect::Locate(sels));
                    }
                }
            }
            (Op::RecoverLocate { dead }, Event::Located(found)) => match found {
                None => self.backing_gone(dead, clock, fx),
                Some(backing) => {
                    self.access(Want::Key, AfterAccess::Recover { dead, backing }, clock, fx)
                }
            },
            (Op::RecoverProbe { dead, backing }, Event::Probed(p)) => {
                let id = dead.ublk_dev_id.unwrap_or_default();
                let recover = if p.recoverable {
                    Some(id)
                } else {
                    tracing::warn!(volume = %self.s.name, block_device = %dead.block_device.display(),
                        "volume {}: ublk device {id} ({}) is gone (removed) or no longer recoverable; opening a new device instead (I/O that was queued on it is lost)", self.s.name, dead.block_device.display());
                    None
                };
                self.op = Some(Op::RecoverSpawn { dead, recover });
                fx.push(Effect::Spawn {
                    dev: backing,
                    recover,
                });
            }
            (Op::RecoverSpawn { dead, recover }, Event::Spawned(r)) => {
                self.recover_spawned(dead, recover, r, clock, fx)
            }
            (Op::GoneRelease { dead }, Event::Cleaned(note)) => {
                tracing::info!(volume = %self.s.name, block_device = %dead.block_device.display(), cleanup = %note, "volume {}: letting go of the held FUSE connection of {}", self.s.name, dead.block_device.display());
                self.backing_gone_ublk(dead, clock, fx);
            }
            (Op::GoneProbe { dead }, Event::Probed(p)) => match (p.recoverable, dead.ublk_dev_id) {
                (true, Some(id)) => {
                    self.op = Some(Op::GoneDelete { dead });
                    fx.push(Effect::DeleteUblk(id));
                }
                _ => self.backing_gone_done(dead, clock, fx),
            },
            (Op::GoneDelete { dead }, Event::UblkDeleted(r)) => {
                if let Err(e) = r {
                    tracing::error!(volume = %self.s.name, error = %e, "volume {}: deleting {} failed: {e}", self.s.name, dead.block_device.display());
                }
                self.backing_gone_done(dead, clock, fx);
            }
            (
                Op::DeadProbe {
                    reason,
                    manual,
                    dead,
                },
                Event::Probed(p),
            ) => {
                if p.recoverable {
                    self.enter_suspended(dead, reason, manual, false, clock, fx);
                } else if dead.ublk_dev_id.is_none() && p.fuse_held {
                    // A held FUSE connection would keep its I/O waiting for a worker that will
                    // not come: let go of it, so that I/O fails as it did before anything was
                    // held.
                    tracing::debug!(volume = %self.s.name, "volume {}: releasing the dead worker's FUSE connection", self.s.name);
                    self.op = Some(Op::DeadRelease { reason, manual });
                    fx.push(Effect::ReleaseFuse(dead));
                } else {
                    self.dead_locked(reason, manual, clock, fx);
                }
            }
            (Op::DeadRelease { reason, manual }, Event::Cleaned(note)) => {
                if let Phase::Restarting { dead, .. } = &self.phase {
                    tracing::info!(volume = %self.s.name, block_device = %dead.block_device.display(), cleanup = %note,
                        "volume {}: not taking over the dead worker's FUSE connection ({reason}); its held I/O fails", self.s.name);
                }
                self.dead_locked(reason, manual, clock, fx);
            }
            (Op::Closing { served }, Event::Closed(r)) => self.closed(served, r, clock, fx),
            (Op::ShutdownStopping, Event::SystemStopping(stopping)) => {
                self.shutdown_dead(stopping, fx)
            }
            (Op::ShutdownDeadProbe { stopping, dead }, Event::Probed(p)) => {
                if stopping && p.recoverable {
                    tracing::warn!(volume = %self.s.name, block_device = %dead.block_device.display(),
                        "volume {}: system shutting down with its worker dead: removing {} (its held I/O fails)", self.s.name, dead.block_device.display());
                    self.op = Some(Op::ShutdownDeadRemove { stopping });
                    fx.push(Effect::ForceRemove {
                        served: dead,
                        suspended: true,
                    });
                } else {
                    // A dead ublk worker's device stays QUIESCED with its I/O held and its
                    // state file in place: the next agent adopts it as suspended and
                    // recovers it.
                    tracing::warn!(volume = %self.s.name, block_device = %dead.block_device.display(),
                        "volume {}: its worker died and was not restarted before shutdown ({} stays for the next agent)", self.s.name, dead.block_device.display());
                    self.shutdown_served(stopping, fx);
                }
            }
            (Op::ShutdownDeadRemove { stopping }, Event::ForceRemoved(_)) => {
                self.shutdown_served(stopping, fx)
            }
            (
                Op::ShutdownServed {
                    block_device,
                    suspended,
                },
                r,
            ) => {
                let bd = block_device.display().to_string();
                match r {
                    Event::ForceRemoved(Err(e)) if suspended => {
                        tracing::error!(volume = %self.s.name, error = %e, "volume {}: removing {bd} failed: {e}", self.s.name);
                    }
                    Event::Closed(Err(e)) if !suspended => {
                        // A device still in use (mounted) is left to its worker, which a later
                        // agent adopts: closing it under a mounted filesystem would break that
                        // filesystem.
                        tracing::warn!(volume = %self.s.name, error = %e, "volume {}: {bd} not closed ({e}); its worker keeps serving", self.s.name);
                    }
                    _ => {}
                }
                fx.push(Effect::ThawHeld(block_device));
                self.stopped(VolumeState::Locked, "agent stopped", fx);
            }
            (op, event) => {
                if cfg!(any(test, debug_assertions)) {
                    panic!("{event:?} is not the outcome {op:?} waits for");
                }
                tracing::error!(volume = %self.s.name, "volume {}: internal error: {event:?} is not the outcome {op:?} waits for; ignored", self.s.name);
                self.op = Some(op);
            }
        }
    }

    fn adopt_found(&mut self, manual: Option<String>, found: Option<Served>, fx: &mut Vec<Effect>) {
        let Some(sv) = found else {
            if manual.is_some() {
                tracing::info!(volume = %self.s.name, "volume {}: stays locked ({}) until kvcrypt unlock", self.s.name, self.reason.as_deref().unwrap_or("-"));
            }
            self.publish(fx);
            return;
        };
        tracing::info!(volume = %self.s.name, block_device = %sv.block_device.display(),
            "volume {}: adopting the running worker serving {}{}", self.s.name, sv.block_device.display(),
            if sv.suspended { " (suspended)" } else { "" });
        let dev = sv.backing.clone();
        self.op = Some(Op::AdoptHeader { manual, served: sv });
        fx.push(Effect::ReadHeader(dev));
    }

    fn adopt(&mut self, manual: Option<String>, sv: Served, clock: Clock, fx: &mut Vec<Effect>) {
        if sv.worker_dead {
            // Agent and worker died together (e.g. `systemctl kill`): the worker's FUSE
            // connection survived in systemd's file descriptor store, its I/O waiting. Recover
            // it as if the worker had just died under us.
            let bd = sv.block_device.display().to_string();
            tracing::warn!(volume = %self.s.name, block_device = %bd,
                "volume {}: its worker is dead; its FUSE connection was kept, so I/O on {bd} waits for a new worker to take it over in place", self.s.name);
            self.phase = Phase::Restarting {
                dead: sv,
                shown: true,
            };
            self.record_ok(clock);
            if let Some(why) = manual {
                self.dead_to_locked(why, true, clock, fx);
                return;
            }
            self.crash_streak = 1;
            self.next = clock.now;
            self.set_state(
                Some("worker found dead at agent start; taking its device over in place".into()),
                fx,
            );
            return;
        }
        let suspended = sv.suspended;
        // Counting from now is the conservative choice for offline_lock_after: the previous
        // agent's last check is unknown.
        self.record_ok(clock);
        if suspended {
            self.phase = Phase::Suspended {
                served: sv,
                since: clock.now,
                killed: false,
            };
            self.suspended_unix = Some(clock.unix);
            let why = match &manual {
                Some(m) => format!("adopted a suspended worker; {m}"),
                None => "adopted a suspended worker".into(),
            };
            self.set_state(Some(why), fx);
        } else {
            // Serving although recorded as locked (the previous agent died half-way): the
            // running device wins; the record is dropped with the next publish.
            self.manual = false;
            self.serve(sv, clock, fx);
            self.set_state(Some("adopted running worker".into()), fx);
        }
        self.next = if self.manual {
            clock.now + IDLE
        } else {
            clock.now
        };
    }

    /// locked/removed → unlocking → serving (or back, with a retry scheduled).
    fn try_unlock(&mut self, fx: &mut Vec<Effect>) {
        let from = self.phase.state();
        self.op = Some(Op::UnlockLocate { from });
        fx.push(Effect::Locate(vec![self.s.selector.clone()]));
    }

    fn unlock_failed(
        &mut self,
        from: VolumeState,
        reason: String,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        // A removed volume waits for restored access: poll it at the check interval.
        // A locked one (boot, absent, vault down) backs off.
        let (back, delay) = if from == VolumeState::Removed {
            (Phase::Removed, self.interval())
        } else {
            (Phase::Locked, self.backoff.next_delay(&mut self.rng))
        };
        self.next = clock.now + delay;
        self.phase = back;
        self.set_state(Some(reason), fx);
    }

    fn unlock_located(
        &mut self,
        from: VolumeState,
        found: Option<PathBuf>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        let Some(dev) = found else {
            let r = format!("device not present ({})", self.s.selector);
            self.unlock_failed(from, r, clock, fx);
            self.waiting_for_device = true;
            return;
        };
        // Every later outcome (success or a failure with the device present) makes a wake
        // carry no news.
        self.waiting_for_device = false;
        self.phase = Phase::Unlocking;
        self.set_state(Some(format!("unlocking {}", dev.display())), fx);
        self.op = Some(Op::UnlockHeader {
            from,
            dev: dev.clone(),
        });
        fx.push(Effect::ReadHeader(dev));
    }

    fn unlock_spawned(
        &mut self,
        from: VolumeState,
        dev: PathBuf,
        r: Result<Served, PlatformError>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        match r {
            Ok(sv) => {
                self.serve(sv, clock, fx);
                self.record_ok(clock);
                self.backoff.reset();
                self.manual = false;
                // Re-attached after removal: no longer suspended (status showed the old time).
                self.suspended_unix = None;
                self.next = clock.now + self.interval();
                let why = if from == VolumeState::Removed {
                    "access restored, re-attached"
                } else {
                    "unlocked"
                };
                self.set_state(Some(why.into()), fx);
            }
            Err(msg) => {
                let e = AccessError::new(
                    AccessClass::Transient,
                    format!("cannot start the worker for {}: {msg}", dev.display()),
                );
                self.record_error(&e, clock);
                self.unlock_failed(from, "worker failed to start".into(), clock, fx);
            }
        }
    }

    /// Starts an access check: unwraps the volume key (unlock, resume) or proves access
    /// (serving), from the slot that worked last first, then every other pinned slot. Reads
    /// the header of the served device first when none is held.
    fn access(&mut self, want: Want, then: AfterAccess, clock: Clock, fx: &mut Vec<Effect>) {
        let Some(slots) = &self.slots else {
            let dev = match &self.phase {
                Phase::Serving { served, .. } | Phase::Suspended { served, .. } => {
                    served.backing.clone()
                }
                _ => {
                    let e = AccessError::new(
                        AccessClass::Misconfigured,
                        "no device to read the header from",
                    );
                    return self.accessed(then, Err(e), clock, fx);
                }
            };
            self.op = Some(Op::Access { want, then });
            fx.push(Effect::ReadHeader(dev));
            return;
        };
        match plan_slots(&self.s, slots, self.slot.as_ref()) {
            Ok(slots) => {
                self.op = Some(Op::Access { want, then });
                fx.push(Effect::Access {
                    slots,
                    want,
                    timeout: self.s.check_timeout,
                });
            }
            Err(e) => self.accessed(then, Err(e), clock, fx),
        }
    }

    /// The access check's result, to the procedure that asked for it.
    fn accessed(
        &mut self,
        then: AfterAccess,
        r: Result<(), AccessError>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        match then {
            AfterAccess::Unlock { from, dev } => match r {
                Ok(()) => {
                    fx.push(Effect::RepairHeader(dev.clone()));
                    self.op = Some(Op::UnlockSpawn {
                        from,
                        dev: dev.clone(),
                    });
                    fx.push(Effect::Spawn { dev, recover: None });
                }
                Err(e) => {
                    self.record_error(&e, clock);
                    if e.class == AccessClass::NotPinned {
                        tracing::error!(volume = %self.s.name, error = %e.message,
                            "volume {}: not unlocked, its key is not pinned: {}", self.s.name, e.message);
                        self.unlock_failed(
                            from,
                            format!("key not pinned: {}", e.message),
                            clock,
                            fx,
                        );
                        return;
                    }
                    self.unlock_failed(
                        from,
                        format!("cannot unwrap the key ({})", e.class),
                        clock,
                        fx,
                    );
                }
            },
            AfterAccess::CheckServing => self.checked_serving(r, clock, fx),
            AfterAccess::CheckSuspended { since } => match r {
                Ok(()) => self.resume("access restored".into(), clock, fx),
                Err(e) => {
                    self.record_error(&e, clock);
                    self.publish(fx);
                    let hold_end = since + self.s.hold;
                    self.next = (clock.now + self.interval()).min(hold_end);
                }
            },
            AfterAccess::UnlockSuspended => match r {
                Ok(()) => self.resume("unlocked by kvcrypt unlock".into(), clock, fx),
                Err(e) => {
                    self.record_error(&e, clock);
                    self.next = clock.now + self.interval();
                    self.publish(fx);
                    self.outcome = Some(Err(format!(
                        "cannot unwrap the key ({}): {}",
                        e.class, e.message
                    )));
                }
            },
            AfterAccess::Recover { dead, backing } => match r {
                Ok(()) => match dead.ublk_dev_id {
                    Some(_) => {
                        self.op = Some(Op::RecoverProbe {
                            dead: dead.clone(),
                            backing,
                        });
                        fx.push(Effect::Probe { served: dead });
                    }
                    None => {
                        self.op = Some(Op::RecoverSpawn {
                            dead,
                            recover: None,
                        });
                        fx.push(Effect::Spawn {
                            dev: backing,
                            recover: None,
                        });
                    }
                },
                Err(e) => {
                    self.record_error(&e, clock);
                    let offline = self.offline_too_long(clock.now);
                    if e.class == AccessClass::Denied || offline {
                        let why = if offline {
                            "no successful access check within offline_lock_after".to_owned()
                        } else {
                            format!("access denied: {}", e.message)
                        };
                        tracing::warn!(volume = %self.s.name, reason = %why, "volume {}: not restarting the dead worker: {why}", self.s.name);
                        self.dead_to_locked(
                            format!("{why} (while its worker was down)"),
                            false,
                            clock,
                            fx,
                        );
                        return;
                    }
                    let d = self.restart_backoff.next_delay(&mut self.rng);
                    self.next = clock.now + d;
                    self.set_state(
                        Some(format!(
                            "worker died; cannot unwrap the key to restart it ({}), retrying in {}",
                            e.class,
                            short(d)
                        )),
                        fx,
                    );
                }
            },
        }
    }

    fn checked_serving(&mut self, r: Result<(), AccessError>, clock: Clock, fx: &mut Vec<Effect>) {
        match r {
            Ok(()) => {
                self.record_ok(clock);
                self.publish(fx);
            }
            Err(e) => {
                self.record_error(&e, clock);
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
                    self.lock(format!("access denied: {}", e.message), false, clock, fx);
                    return;
                }
                if let (Some(limit), Some(ok)) = (self.s.offline_lock_after, self.health.last_ok) {
                    let offline = clock.now.saturating_duration_since(ok);
                    if offline >= limit {
                        let r = format!(
                            "no successful access check for {} (offline_lock_after)",
                            humantime::format_duration(Duration::from_secs(offline.as_secs()))
                        );
                        self.lock(r, false, clock, fx);
                        return;
                    }
                }
                self.publish(fx);
            }
        }
        self.next = clock.now + self.interval();
    }

    /// serving → suspended (→ removed with policy `remove`): freeze, wipe, hold I/O.
    fn lock(&mut self, reason: String, manual: bool, clock: Clock, fx: &mut Vec<Effect>) {
        self.manual = manual;
        let Phase::Serving { served, .. } = &self.phase else {
            self.phase = Phase::Locked;
            self.set_state(Some(reason), fx);
            let _ = clock;
            return;
        };
        let served = served.clone();
        // Suspending a ublk worker ends it (and closing any worker does): not a crash.
        fx.push(Effect::Unwatch);
        // Freeze first so everything the filesystem acknowledged is on the device before
        // I/O stops; thaw only after resume (thawing writes the superblock).
        let block_device = served.block_device.clone();
        self.op = Some(Op::LockSuspend {
            reason,
            manual,
            served,
        });
        fx.push(Effect::Suspend { block_device });
    }

    /// The key is gone and I/O is held: record when, then apply the revoke policy (`remove`
    /// deletes the device at once; `hold` waits for access to come back).
    fn enter_suspended(
        &mut self,
        served: Served,
        reason: String,
        manual: bool,
        killed: bool,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        self.manual = manual;
        self.phase = Phase::Suspended {
            served,
            since: clock.now,
            killed,
        };
        self.suspended_unix = Some(clock.unix);
        self.set_state(Some(reason.clone()), fx);
        if self.s.revoke_policy == RevokePolicy::Remove {
            self.remove(reason, clock, fx);
            return;
        }
        self.next = self.next_check(manual, clock.now);
    }

    fn check_suspended(&mut self, since: Instant, clock: Clock, fx: &mut Vec<Effect>) {
        if self.manual {
            self.next = clock.now + IDLE;
            return;
        }
        if self.s.revoke_policy == RevokePolicy::Remove {
            // Switched to `remove` by a reload while suspended.
            self.remove("revoke_policy is remove".into(), clock, fx);
            return;
        }
        if clock.now.saturating_duration_since(since) >= self.s.hold {
            let r = format!(
                "access not restored within hold ({})",
                humantime::format_duration(self.s.hold)
            );
            self.remove(r, clock, fx);
            return;
        }
        self.access(Want::Key, AfterAccess::CheckSuspended { since }, clock, fx);
    }

    /// suspended → removed: hook, then close the device.
    fn remove(&mut self, reason: String, clock: Clock, fx: &mut Vec<Effect>) {
        fx.push(Effect::Unwatch);
        match &self.phase {
            Phase::Suspended { served, .. } => {
                let served = served.clone();
                self.op = Some(Op::RemoveHook {
                    reason: reason.clone(),
                    served: served.clone(),
                });
                fx.push(Effect::RunHook {
                    block_device: served.block_device,
                    reason,
                });
            }
            _ => self.removed(reason, clock, fx),
        }
    }

    fn removed(&mut self, reason: String, clock: Clock, fx: &mut Vec<Effect>) {
        self.slots = None;
        self.worker = None;
        self.next = self.next_check(self.manual, clock.now);
        self.phase = Phase::Removed;
        self.set_state(Some(reason), fx);
    }

    /// suspended → serving: the held key to a worker, then thaw.
    fn resume(&mut self, why: String, clock: Clock, fx: &mut Vec<Effect>) {
        let Phase::Suspended { served, killed, .. } = &self.phase else {
            fx.push(Effect::DropKey);
            self.outcome = Some(Err("not suspended".into()));
            let _ = clock;
            return;
        };
        let served = served.clone();
        let how = match served.ublk_dev_id {
            // ublk: suspend ended the worker and left the device QUIESCED with its I/O held
            // (there is no in-process resume); a new worker recovers the same device.
            Some(id) => ResumeHow::Ublk(id),
            // Killed after a failed suspend: a new worker takes over the held device.
            None if *killed => ResumeHow::AfterKill,
            None => ResumeHow::InProcess,
        };
        let effect = match how {
            ResumeHow::Ublk(id) => Effect::Spawn {
                dev: served.backing.clone(),
                recover: Some(id),
            },
            ResumeHow::AfterKill => Effect::Spawn {
                dev: served.backing.clone(),
                recover: None,
            },
            ResumeHow::InProcess => Effect::ResumeWorker,
        };
        self.op = Some(Op::Resume { why, served, how });
        fx.push(effect);
    }

    fn resumed(
        &mut self,
        why: String,
        old: Served,
        r: Result<Served, String>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        match r {
            Ok(served) => {
                let bd = served.block_device.clone();
                self.serve(served, clock, fx);
                fx.push(Effect::Thaw(bd));
                self.record_ok(clock);
                self.manual = false;
                self.suspended_unix = None;
                self.next = clock.now + self.interval();
                self.set_state(Some(why), fx);
                self.outcome = Some(Ok("resumed".to_owned()));
            }
            Err(e) => {
                tracing::error!(volume = %self.s.name, error = %e, "volume {}: resuming the worker failed: {e}; re-attaching", self.s.name);
                self.outcome = Some(Err(e.clone()));
                self.op = Some(Op::ResumeFailed {
                    error: e,
                    block_device: old.block_device.clone(),
                });
                fx.push(Effect::ForceRemove {
                    served: old,
                    suspended: true,
                });
            }
        }
    }

    /// The serving worker ended without being asked to (crash, SIGKILL, OOM kill). Its key
    /// died with it. ublk keeps the device (`UBLK_F_USER_RECOVERY | REISSUE`): QUIESCED, I/O
    /// held, to be recovered in place by a new worker. FUSE loses its connection: the loop
    /// device fails I/O, so it is detached and the volume opened again. The first death after
    /// a stable run restarts at once; deaths in a row back off.
    fn worker_died(&mut self, detail: String, clock: Clock, fx: &mut Vec<Effect>) {
        fx.push(Effect::Unwatch);
        self.worker = None;
        let Phase::Serving { served, since } = &self.phase else {
            let _ = clock;
            return;
        };
        let (served, since) = (served.clone(), Some(*since));
        self.op = Some(Op::DiedProbe {
            detail,
            served: served.clone(),
            since,
        });
        fx.push(Effect::Probe { served });
    }

    fn died_probed(
        &mut self,
        detail: String,
        served: Served,
        since: Option<Instant>,
        p: DeadProbe,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        // The worker is gone: it no longer serves, whatever follows.
        self.phase = Phase::Restarting {
            dead: served.clone(),
            shown: served.ublk_dev_id.is_some() || p.fuse_held,
        };
        if !self.configured && !p.recoverable {
            // Removed from the configuration: its worker ending (`kvcrypt close`, or a crash)
            // ends the agent's care for it; it is not opened again. A ublk device still
            // QUIESCED with I/O held is the exception: dropping it would hang that I/O
            // forever, so it is recovered as usual.
            let effect = if p.fuse_held {
                Effect::ReleaseFuse(served.clone())
            } else {
                Effect::CleanDeadWorker(served.clone())
            };
            self.op = Some(Op::DiedClean {
                detail,
                served,
                unconfigured: true,
                fuse_held: p.fuse_held,
                retry_in: String::new(),
                delay: Duration::ZERO,
            });
            fx.push(effect);
            return;
        }
        if since.is_some_and(|t| clock.now.saturating_duration_since(t) >= STABLE_RUN) {
            self.crash_streak = 0;
            self.restart_backoff.reset();
        }
        self.crash_streak = self.crash_streak.saturating_add(1);
        let delay = if self.crash_streak == 1 {
            Duration::ZERO
        } else {
            self.restart_backoff.next_delay(&mut self.rng)
        };
        let bd = served.block_device.display().to_string();
        let retry_in = short(delay);
        if served.ublk_dev_id.is_some() {
            tracing::warn!(volume = %self.s.name, block_device = %bd, crashes_in_a_row = self.crash_streak, %retry_in,
                "volume {}: serving worker died ({detail}); {bd} holds its I/O until a new worker recovers it (restart in {retry_in}, crash {} in a row)",
                self.s.name, self.crash_streak);
            self.restart_later(served, false, detail, retry_in, delay, clock, fx);
            return;
        }
        self.op = Some(Op::DiedClean {
            detail,
            served: served.clone(),
            unconfigured: false,
            fuse_held: p.fuse_held,
            retry_in,
            delay,
        });
        fx.push(Effect::CleanDeadWorker(served));
    }

    #[allow(clippy::too_many_arguments)]
    fn restart_later(
        &mut self,
        dead: Served,
        fuse_held: bool,
        detail: String,
        retry_in: String,
        delay: Duration,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        self.phase = Phase::Restarting {
            shown: dead.ublk_dev_id.is_some() || fuse_held,
            dead,
        };
        self.next = clock.now + delay;
        self.set_state(
            Some(format!("worker died ({detail}); restarting in {retry_in}")),
            fx,
        );
    }

    /// Replaces a dead worker: unwrap the key again (the agent does not keep it), then recover
    /// the same ublk device, or open the volume again (FUSE, or a ublk device that is gone).
    /// A denial (or `offline_lock_after`) on the way ends in suspended/locked, not a worker.
    fn recover_worker(&mut self, dead: Served, fx: &mut Vec<Effect>) {
        self.op = Some(Op::RecoverAdopt { dead });
        fx.push(Effect::Adopt);
    }

    fn recover_spawned(
        &mut self,
        dead: Served,
        recover: Option<u32>,
        r: Result<Served, PlatformError>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        let bd = dead.block_device.display().to_string();
        match r {
            Ok(new) => {
                self.restarts = self.restarts.saturating_add(1);
                let nb = new.block_device.display().to_string();
                let how = match (recover, dead.ublk_dev_id) {
                    (Some(_), _) => format!("recovered {nb} in place; held I/O resumes"),
                    (None, None) if new.in_place => {
                        format!("recovered {nb} in place; held I/O resumes")
                    }
                    (None, Some(_)) => format!("opened a new device {nb} ({bd} was gone)"),
                    (None, None) => format!("re-opened as {nb} (I/O on {bd} failed meanwhile)"),
                };
                tracing::warn!(volume = %self.s.name, block_device = %nb, restarts = self.restarts, crashes_in_a_row = self.crash_streak,
                    "volume {}: worker restarted after it died: {how}", self.s.name);
                self.serve(new, clock, fx);
                self.record_ok(clock);
                self.next = clock.now + self.interval();
                self.set_state(Some(format!("worker restarted: {how}")), fx);
            }
            Err(msg) => {
                let e = AccessError::new(
                    AccessClass::Transient,
                    format!(
                        "cannot restart the worker for {}: {msg}",
                        dead.backing.display()
                    ),
                );
                self.record_error(&e, clock);
                let d = self.restart_backoff.next_delay(&mut self.rng);
                let retry_in = short(d);
                tracing::error!(volume = %self.s.name, error = %msg, %retry_in,
                    "volume {}: restarting the dead worker failed: {msg}; retrying in {retry_in}", self.s.name);
                self.next = clock.now + d;
                self.set_state(
                    Some("worker died; restarting it failed, retrying".into()),
                    fx,
                );
            }
        }
    }

    /// The backing disk of a dead worker is gone: no worker can serve it. A ublk device still
    /// QUIESCED would hold its I/O forever (nothing can recover it without the disk), so it is
    /// deleted and that I/O fails, as it would on the vanished disk. The volume then waits for
    /// its device, as at boot.
    fn backing_gone(&mut self, dead: Served, clock: Clock, fx: &mut Vec<Effect>) {
        let held = matches!(self.phase, Phase::Restarting { shown: true, .. });
        if dead.ublk_dev_id.is_none() && held {
            self.op = Some(Op::GoneRelease { dead: dead.clone() });
            fx.push(Effect::ReleaseFuse(dead));
            return;
        }
        self.backing_gone_ublk(dead, clock, fx);
    }

    fn backing_gone_ublk(&mut self, dead: Served, clock: Clock, fx: &mut Vec<Effect>) {
        if dead.ublk_dev_id.is_some() {
            self.op = Some(Op::GoneProbe { dead: dead.clone() });
            fx.push(Effect::Probe { served: dead });
            return;
        }
        self.backing_gone_done(dead, clock, fx);
    }

    fn backing_gone_done(&mut self, dead: Served, clock: Clock, fx: &mut Vec<Effect>) {
        let bd = dead.block_device.display().to_string();
        let reason = format!(
            "backing device {} removed; {bd} closed",
            dead.backing.display()
        );
        tracing::warn!(volume = %self.s.name, block_device = %bd, "volume {}: {reason}; waiting for the device", self.s.name);
        self.slots = None;
        self.slot = None;
        self.worker = None;
        self.crash_streak = 0;
        self.restart_backoff.reset();
        self.backoff.reset();
        self.next = clock.now + self.backoff.next_delay(&mut self.rng);
        // As at boot without the disk: a wake (udev attach) retries at once when it is back.
        self.waiting_for_device = true;
        self.phase = Phase::Locked;
        self.set_state(Some(format!("device not present ({reason})")), fx);
    }

    /// A revocation, `kvcrypt lock` or the offline limit while the worker is dead: no worker
    /// is started. A ublk device still QUIESCED is exactly a suspended ublk volume (I/O held, no
    /// key anywhere): it becomes `suspended` (resume recovers it, hold expiry deletes it).
    /// Otherwise (FUSE: the device is gone with the worker) the volume is `locked`.
    fn dead_to_locked(&mut self, reason: String, manual: bool, clock: Clock, fx: &mut Vec<Effect>) {
        let Phase::Restarting { dead, .. } = &self.phase else {
            let _ = clock;
            return;
        };
        let dead = dead.clone();
        self.manual = manual;
        self.op = Some(Op::DeadProbe {
            reason,
            manual,
            dead: dead.clone(),
        });
        fx.push(Effect::Probe { served: dead });
    }

    fn dead_locked(&mut self, reason: String, manual: bool, clock: Clock, fx: &mut Vec<Effect>) {
        self.phase = Phase::Locked;
        self.next = self.next_check(manual, clock.now);
        self.set_state(Some(reason), fx);
    }

    fn shutdown(&mut self, fx: &mut Vec<Effect>) {
        fx.push(Effect::Unwatch);
        // A suspended volume (key gone, I/O held) is left as it is when only the agent stops
        // (`systemctl restart`): the next agent adopts it and resumes it in place. When the
        // whole machine goes down nothing will ever resume it, and its held I/O would hang the
        // shutdown (the final sync waits on it; thawing writes the superblock into it): then
        // the device is removed, the held I/O fails (none of it was acknowledged; the freeze
        // wrote back everything that was), and the filesystem is thawed onto the dead device.
        if matches!(
            self.phase,
            Phase::Suspended { .. } | Phase::Restarting { .. }
        ) {
            self.op = Some(Op::ShutdownStopping);
            fx.push(Effect::SystemStopping);
            return;
        }
        self.shutdown_dead(false, fx);
    }

    fn shutdown_dead(&mut self, stopping: bool, fx: &mut Vec<Effect>) {
        if let Phase::Restarting { dead, .. } = &self.phase {
            let dead = dead.clone();
            self.phase = Phase::Locked;
            match dead.ublk_dev_id {
                Some(_) => {
                    self.op = Some(Op::ShutdownDeadProbe {
                        stopping,
                        dead: dead.clone(),
                    });
                    fx.push(Effect::Probe { served: dead });
                }
                None => {
                    tracing::warn!(volume = %self.s.name, block_device = %dead.block_device.display(),
                        "volume {}: its worker died and was not restarted before shutdown ({} stays for the next agent)", self.s.name, dead.block_device.display());
                    self.shutdown_served(stopping, fx);
                }
            }
            return;
        }
        self.shutdown_served(stopping, fx);
    }

    fn shutdown_served(&mut self, stopping: bool, fx: &mut Vec<Effect>) {
        let (served, suspended) = match &self.phase {
            Phase::Serving { served, .. } => (served.clone(), false),
            Phase::Suspended { served, .. } => (served.clone(), true),
            _ => {
                self.stopped(VolumeState::Locked, "agent stopped", fx);
                return;
            }
        };
        let bd = served.block_device.display().to_string();
        if suspended && !stopping {
            // Thawing now would block on the held I/O; the next agent thaws after resume.
            tracing::info!(volume = %self.s.name, block_device = %bd,
                "volume {}: agent stopping while {bd} is suspended: left suspended for the next agent", self.s.name);
            fx.push(Effect::ForgetFrozen);
            self.stopped(VolumeState::Suspended, "agent stopped; left suspended", fx);
            return;
        }
        self.op = Some(Op::ShutdownServed {
            block_device: served.block_device.clone(),
            suspended,
        });
        if suspended {
            tracing::warn!(volume = %self.s.name, block_device = %bd,
                "volume {}: system shutting down while suspended: removing {bd} (I/O held since the suspension fails)", self.s.name);
            fx.push(Effect::ForceRemove {
                served,
                suspended: true,
            });
        } else {
            fx.push(Effect::Close { force: false });
        }
    }

    fn stopped(&mut self, state: VolumeState, reason: &str, fx: &mut Vec<Effect>) {
        self.worker = None;
        self.phase = Phase::Stopped(state);
        self.set_state(Some(reason.into()), fx);
    }
}

/// The slots to try, in order: only those naming a key the configuration pins (with the pin's
/// host: the disk is not trusted to choose the vault), the one that worked last first — after
/// a key rotation (`kvcrypt rewrap` added a slot for the new version) a disabled old version
/// must not lock a volume the new slot still opens.
fn plan_slots(
    s: &VolumeSettings,
    slots: &[SlotRef],
    last: Option<&SlotRef>,
) -> Result<Vec<SlotRef>, AccessError> {
    if slots.is_empty() {
        return Err(AccessError::new(
            AccessClass::Misconfigured,
            "the volume header has no key slot",
        ));
    }
    // Pinning, before any request.
    let ids: Vec<&str> = slots.iter().map(|s| s.key_id.as_str()).collect();
    let chosen = s
        .pins
        .select(&ids)
        .map_err(|e| AccessError::new(AccessClass::NotPinned, e.0))?;
    let mut slots: Vec<SlotRef> = slots
        .iter()
        .cloned()
        .zip(chosen)
        .filter_map(|(mut slot, id)| match id {
            Some(id) => {
                slot.key_id = id;
                Some(slot)
            }
            None => {
                tracing::debug!(volume = %s.name, key_id = %slot.key_id,
                    "volume {}: key slot {} is not pinned; not tried", s.name, slot.key_id);
                None
            }
        })
        .collect();
    if let Some(last) = last
        && let Some(i) = slots.iter().position(|s| s.key_id == last.key_id)
    {
        let s = slots.remove(i);
        slots.insert(0, s);
    }
    Ok(slots)
}

/// One error for a failed access check: with several slots, one transient failure means "maybe
/// later" — the volume is not treated as revoked while any slot could still work.
fn combine(errors: &[AccessError]) -> AccessError {
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
    AccessError::new(class, message)
}
