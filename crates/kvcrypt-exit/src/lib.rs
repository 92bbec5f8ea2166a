//! Process exit codes. Every failure class an operator can act on has its own code,
//! so scripts and systemd units can tell "wrong key" from "vault unreachable".
//! The table is documented in README.md §Exit codes; keep both in sync.

// This crate needs no `unsafe`; the compiler keeps it that way.
#![forbid(unsafe_code)]

/// Distinct exit codes of the `kvcrypt` binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    /// Unclassified failure.
    Failure = 1,
    /// Bad command line (clap uses 2 as well).
    Usage = 2,
    /// The device holds no kvcrypt header (or is too small to hold one).
    NotKvcrypt = 3,
    /// Header damaged beyond repair, tampered with, or an unsupported version.
    HeaderInvalid = 4,
    /// Key Vault denied access (revoked permission, disabled/deleted key, firewall, identity).
    AccessDenied = 5,
    /// Key Vault unreachable or failing transiently (network, TLS, 5xx, throttling, timeout).
    VaultUnavailable = 6,
    /// Bad configuration or credentials setup (config file, key id, credential files).
    Config = 7,
    /// The unwrapped key does not match the volume's key check (wrong key / wrong slot).
    WrongKey = 8,
    /// I/O error on the device, or a device of the wrong size.
    Device = 9,
    /// Refused to overwrite existing data / device or name busy.
    Busy = 10,
    /// A named volume, agent or socket was not found.
    NotFound = 11,
    /// Permission denied locally (not root, socket peer refused).
    Permission = 12,
    /// A required kernel feature (ublk, FUSE, loop) is missing.
    Unsupported = 13,
    /// The volume is being served (by the agent, a worker or `kvcrypt open`) or its block
    /// device is held open exclusively by someone else; destructive commands refuse it and no
    /// flag overrides that.
    InUse = 14,
    /// The header names a key the configuration does not pin for this volume; refused before
    /// any network request.
    NotPinned = 15,
    /// Key memory cannot be locked in RAM (memfd_secret and mlock failed) and swappable key
    /// pages are not allowed (`KVCRYPT_ALLOW_UNLOCKED_KEY_MEMORY=1`).
    KeyMemory = 16,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Implemented by every typed library error so the CLI edge can map a failure to its exit code.
pub trait ExitClass {
    fn exit_class(&self) -> Exit;
}
