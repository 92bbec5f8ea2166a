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
//! Files: `events` (the [`Event`]s in and [`Effect`]s out), `state` (the [`Phase`]s with their
//! data, and what a procedure under way waits for), `commands` (outside events), `outcome`
//! (continuing a procedure with its effect's outcome), `unlock` (adopt, unlock, the access check),
//! `revoke` (check, suspend, remove, resume), `restart` (a worker that died), `shutdown`, `slots`
//! (which key slots to ask, and what their answers add up to).
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
use crate::agent::ports::{
    AccessClass, AccessError, CloseFailed, KeyView, PlatformError, RotationReport, Served, SlotRef,
};
use crate::agent::status::{
    Counters, LastError, PolicyView, SlotStatus, VolumeState, VolumeStatus,
};

mod commands;
mod events;
mod outcome;
mod restart;
mod revoke;
mod rotation;
mod shutdown;
mod slots;
mod state;
mod unlock;

pub use events::{Clock, CloseRefused, DeadProbe, Desired, Effect, Event, Want};
use slots::{combine, plan_slots};
use state::{AfterAccess, Op, Pending, Phase, ResumeHow};

/// Far enough in the future to mean "no timer".
pub const IDLE: Duration = Duration::from_secs(86_400 * 365);

/// A worker that served this long before it died was not crash-looping: its death is restarted
/// at once and starts a new backoff sequence. Shorter lives back off (`unlock_retry`).
pub const STABLE_RUN: Duration = Duration::from_secs(60);

/// How long a worker may take to confirm a suspend (it waits for in-flight I/O) before it is
/// killed so that its key is gone.
pub const SUSPEND_TIMEOUT: Duration = Duration::from_secs(35);

/// Health seen by the access checks (published in the status).
#[derive(Debug, Clone, Default)]
pub(super) struct Health {
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
    /// When the next round of rotation following is due (at the first access check after
    /// the volume starts serving, then every `rotation_check`).
    rotation_due: Instant,
    /// Unix time of `rotation_due`, published.
    rotation_due_unix: Option<f64>,
    /// Every pinned key's current version, as the last round saw it.
    keys: Vec<KeyView>,
    /// Versioned key id → Unix time its slot last unwrapped or passed an access check.
    verified: std::collections::BTreeMap<String, f64>,
    op: Option<Op>,
    pending: Option<Pending>,
    /// The outcome a [`Pending::UnlockSuspended`] answer reports.
    outcome: Option<Result<String, String>>,
    ended: bool,
    /// Published for the metrics (checks, latency, suspensions, resumes, removals).
    counters: Counters,
    /// When the Key Vault request of the access check under way was sent (its latency is
    /// measured from the clock of that step to the clock of its outcome).
    check_sent: Option<Instant>,
}

pub(super) fn short(d: Duration) -> String {
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
            rotation_due: now,
            rotation_due_unix: None,
            keys: Vec::new(),
            verified: Default::default(),
            op: None,
            pending: None,
            outcome: None,
            ended: false,
            counters: Counters::default(),
            check_sent: None,
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
    pub(super) fn settle(&mut self, fx: &mut Vec<Effect>) {
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
    pub(super) fn finished(&self) -> bool {
        !self.configured && matches!(self.phase, Phase::Locked | Phase::Removed)
    }

    pub(super) fn interval(&mut self) -> Duration {
        jitter(self.s.check_interval, self.s.check_jitter, &mut self.rng)
    }

    /// When to look again at a volume that is not serving: a manual lock waits for
    /// `kvcrypt unlock` (idle), otherwise the normal check interval.
    pub(super) fn next_check(&mut self, manual: bool, now: Instant) -> Instant {
        if manual {
            now + IDLE
        } else {
            now + self.interval()
        }
    }

    /// Publishes the status; logs one event per state change (no secrets: ids and reasons).
    pub(super) fn set_state(&mut self, reason: Option<String>, fx: &mut Vec<Effect>) {
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

    pub(super) fn publish(&mut self, fx: &mut Vec<Effect>) {
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
            slots: self.slot_statuses(),
            keys: self.keys.clone(),
            rotation_next: self
                .rotation_due_unix
                .filter(|_| self.s.follow_rotation && self.phase.state() == VolumeState::Serving),
            counters: self.counters.clone(),
        })));
    }

    /// The header's slots as `kvcrypt status` shows them.
    fn slot_statuses(&self) -> Vec<SlotStatus> {
        let Some(slots) = &self.slots else {
            return Vec::new();
        };
        slots
            .iter()
            .map(|s| SlotStatus {
                key_id: s.key_id.clone(),
                algorithm: s.algorithm.clone(),
                verified_at: self.verified.get(&s.key_id).copied(),
                in_use: self.slot.as_ref().is_some_and(|u| u.key_id == s.key_id),
                current: self.keys.iter().any(|k| k.current == s.key_id),
                expires: self
                    .keys
                    .iter()
                    .find(|k| k.current == s.key_id)
                    .and_then(|k| k.expires),
                share: s.share,
            })
            .collect()
    }

    pub(super) fn record_error(&mut self, e: &AccessError, clock: Clock) {
        self.health.last_error = Some(LastError {
            class: e.class,
            message: e.message.clone(),
            at: clock.unix as u64,
        });
    }

    pub(super) fn record_ok(&mut self, clock: Clock) {
        self.health.last_ok = Some(clock.now);
        self.health.last_ok_unix = Some(clock.unix);
    }

    /// Starts watching the worker that now serves (a new one, or the same one resumed).
    pub(super) fn serve(&mut self, served: Served, clock: Clock, fx: &mut Vec<Effect>) {
        fx.push(Effect::Watch);
        // Rotation is followed from the first access check of every serving spell.
        self.rotation_due = clock.now;
        self.phase = Phase::Serving {
            served,
            since: clock.now,
        };
    }

    /// How long since the last successful check, once that is `offline_lock_after` or more
    /// (`None` while within the limit, or with no limit set).
    pub(super) fn offline_for(&self, now: Instant) -> Option<Duration> {
        let (limit, ok) = (self.s.offline_lock_after?, self.health.last_ok?);
        let offline = now.saturating_duration_since(ok);
        (offline >= limit).then_some(offline)
    }
}

/// The reason a volume is locked by `offline_lock_after`, with the time offline in whole
/// seconds.
pub(super) fn offline_reason(offline: Duration) -> String {
    format!(
        "no successful access check for {} (offline_lock_after)",
        humantime::format_duration(Duration::from_secs(offline.as_secs()))
    )
}
