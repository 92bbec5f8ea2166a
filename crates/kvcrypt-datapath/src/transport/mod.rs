//! How the kernel sees the plaintext device.
//!
//! - [`ublk`]: the primary transport (libublk; `/dev/ublkbN`).
//! - [`fuse`]: the fallback where `/dev/ublk-control` is missing — the plaintext is one file in
//!   a private FUSE mount, attached to a [`loopdev`] loop device with direct I/O.

pub mod fuse;
pub mod loopdev;
pub mod ublk;

use std::path::Path;

use kvcrypt_exit::{Exit, ExitClass};

/// The ublk transport is always compiled in; whether the kernel offers it is checked at run time.
pub const UBLK_COMPILED_IN: bool = true;

/// Where runtime state of served volumes lives.
pub const RUN_DIR: &str = "/run/kvcrypt";

/// Transport chosen for `--transport auto`.
pub fn auto_is_ublk() -> bool {
    UBLK_COMPILED_IN && Path::new("/dev/ublk-control").exists()
}

/// Which transport serves a volume: the configuration's `transport =`, `kvcrypt open
/// --transport` and the worker's command line all name it. With the `clap` feature it is also
/// a command-line value (`auto`, `ublk`, `fuse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// ublk if /dev/ublk-control exists, FUSE + loop otherwise.
    Auto,
    Ublk,
    Fuse,
}

impl TransportKind {
    /// The name used in configuration files and on command lines.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Auto => "auto",
            TransportKind::Ublk => "ublk",
            TransportKind::Fuse => "fuse",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("FUSE is not available ({0}); load the fuse module or use --transport ublk")]
    NoFuse(std::io::Error),
    #[error("cannot mount the FUSE file {path}: {source}")]
    Mount {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("FUSE setup failed: {0}")]
    Setup(String),
    #[error(transparent)]
    Loop(#[from] loopdev::LoopError),
    #[error("{0} is in use (mounted or held open); unmount it first")]
    Busy(String),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("flushing the volume failed: {0}")]
    Flush(std::io::Error),
}

impl ExitClass for TransportError {
    fn exit_class(&self) -> Exit {
        match self {
            TransportError::NoFuse(_) => Exit::Unsupported,
            TransportError::Loop(loopdev::LoopError::Control(_)) => Exit::Unsupported,
            TransportError::Busy(_) => Exit::Busy,
            TransportError::Engine(e) => e.exit_class(),
            _ => Exit::Device,
        }
    }
}

/// The positive errno a transport reports to the kernel for a failed backing I/O or target
/// call (FUSE replies and ublk completions carry it negated); EIO when the error has none.
pub(crate) fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().filter(|&n| n > 0).unwrap_or(libc::EIO)
}
