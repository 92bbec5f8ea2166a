//! The states of a volume with the data that exists only in them ([`Phase`]), and what a
//! procedure under way waits for ([`Op`]).

use super::*;

/// Where the volume is, with the data that exists only there.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Phase {
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
    pub(super) fn state(&self) -> VolumeState {
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
pub(super) enum Pending {
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
pub(super) enum Op {
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
    /// A round of rotation following (while serving).
    Rotate,
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
pub(super) enum AfterAccess {
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
pub(super) enum ResumeHow {
    /// A new worker recovers the QUIESCED ublk device.
    Ublk(u32),
    /// A new worker takes over the device the killed worker held.
    AfterKill,
    /// The suspended FUSE worker gets its key back.
    InProcess,
}
