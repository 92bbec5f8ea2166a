//! What goes into the core ([`Event`]) and what comes out ([`Effect`]), with the values they
//! carry.

use super::*;

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
    /// The slots that granted — one under policy `any`, the threshold's worth of shares under
    /// a split policy; the first is the one to try first next time (for [`Want::Key`] the shell
    /// now holds the checked key) — or every slot's error in the order tried.
    Access(Result<Vec<SlotRef>, Vec<AccessError>>),
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
    /// What a round of rotation following found and did (the shell already holds the new
    /// header, if one was written).
    Rotated(Result<RotationReport, PlatformError>),
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
    /// Follow key rotation on the header of `dev` → [`Event::Rotated`].
    FollowRotation(PathBuf),
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
