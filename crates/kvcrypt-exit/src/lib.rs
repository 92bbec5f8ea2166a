//! Process exit codes. Every failure class an operator can act on has its own code,
//! so scripts and systemd units can tell "wrong key" from "vault unreachable".
//! The table is documented in README.md §Exit codes; keep both in sync.
//!
//! [`Failure`] carries an error to the edge of a command together with its exit code. The code
//! is fixed by a typed conversion where the error is made (`?` on a typed error uses its
//! [`ExitClass`]; an error without a class is given one by [`Failure::new`] or
//! [`Failure::wrap`]), so the compiler, not a list of known types, makes sure every failure
//! has its code. This crate holds it rather than the binary because the demo and any other
//! command line of the workspace need the same edge; it depends on `anyhow` only for the error
//! chain (context joined by ": " in `{:#}`), which every command prints.

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
    /// A recovery key file (`--recovery-public-key`, `--private-key`) is not an RSA key kvcrypt
    /// accepts: not PEM, not RSA, encrypted, or a size other than 3072 or 4096 bits.
    RecoveryKey = 17,
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

/// Failures of the operating system: today's mapping of the CLI (a missing file or socket is
/// `NotFound`, a refused one `Permission`, anything else an I/O failure of the device).
impl ExitClass for std::io::Error {
    fn exit_class(&self) -> Exit {
        match self.kind() {
            std::io::ErrorKind::NotFound => Exit::NotFound,
            std::io::ErrorKind::PermissionDenied => Exit::Permission,
            _ => Exit::Device,
        }
    }
}

/// A failed command: the error to print and the exit code it was given when it was made.
///
/// There is deliberately no conversion from `anyhow::Error` or from errors without an
/// [`ExitClass`]: they must be given a class at the place they arise ([`Failure::new`],
/// [`Failure::wrap`]), so no error becomes `Exit::Failure` by being forgotten.
pub struct Failure {
    exit: Exit,
    error: anyhow::Error,
}

impl Failure {
    /// A failure described by a message, with the exit code it has.
    pub fn new<M>(exit: Exit, message: M) -> Failure
    where
        M: std::fmt::Display + std::fmt::Debug + Send + Sync + 'static,
    {
        Failure {
            exit,
            error: anyhow::Error::msg(message),
        }
    }

    /// An error that has no class of its own (a foreign error type, or an `anyhow::Error` of a
    /// helper), given the exit code it has here. Its source chain is kept for `{:#}`.
    pub fn wrap(exit: Exit, error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            exit,
            error: error.into(),
        }
    }

    /// The process exit code for this failure.
    pub fn exit(&self) -> Exit {
        self.exit
    }

    /// The error and its chain of causes and context.
    pub fn error(&self) -> &anyhow::Error {
        &self.error
    }

    /// Adds a line of context (printed before the error, as with `anyhow`); the exit code
    /// stays the one the error had.
    pub fn context<C>(self, context: C) -> Failure
    where
        C: std::fmt::Display + Send + Sync + 'static,
    {
        Failure {
            exit: self.exit,
            error: self.error.context(context),
        }
    }
}

/// `?` on a typed error: its exit code is read now, while its type is known.
impl<E> From<E> for Failure
where
    E: ExitClass + std::error::Error + Send + Sync + 'static,
{
    fn from(e: E) -> Failure {
        Failure {
            exit: e.exit_class(),
            error: anyhow::Error::new(e),
        }
    }
}

/// As `anyhow::Error`: `{}` is the outermost message, `{:#}` the chain joined by ": ".
impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.error, f)
    }
}

impl std::fmt::Debug for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[exit {:?}] {:?}", self.exit, self.error)
    }
}

/// `anyhow::Context` for results at a command's edge: adds context to a typed error or a
/// [`Failure`] and keeps its exit code.
pub trait Context<T> {
    fn context<C>(self, context: C) -> Result<T, Failure>
    where
        C: std::fmt::Display + Send + Sync + 'static;

    fn with_context<C, F>(self, f: F) -> Result<T, Failure>
    where
        C: std::fmt::Display + Send + Sync + 'static,
        F: FnOnce() -> C;
}

impl<T, E: Into<Failure>> Context<T> for Result<T, E> {
    fn context<C>(self, context: C) -> Result<T, Failure>
    where
        C: std::fmt::Display + Send + Sync + 'static,
    {
        self.map_err(|e| e.into().context(context))
    }

    fn with_context<C, F>(self, f: F) -> Result<T, Failure>
    where
        C: std::fmt::Display + Send + Sync + 'static,
        F: FnOnce() -> C,
    {
        self.map_err(|e| e.into().context(f()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A typed error whose class is not the generic one, so losing it shows.
    #[derive(Debug)]
    struct Wrong;
    impl std::fmt::Display for Wrong {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrong key")
        }
    }
    impl std::error::Error for Wrong {}
    impl ExitClass for Wrong {
        fn exit_class(&self) -> Exit {
            Exit::WrongKey
        }
    }

    fn typed() -> Result<(), Wrong> {
        Err(Wrong)
    }

    fn edge() -> Result<(), Failure> {
        typed()?;
        Ok(())
    }

    #[test]
    fn the_class_is_taken_at_the_conversion_and_survives_context() {
        assert_eq!(edge().unwrap_err().exit(), Exit::WrongKey);
        let e = edge().context("opening data").unwrap_err();
        assert_eq!(e.exit(), Exit::WrongKey);
        let e = typed()
            .with_context(|| "slot 0")
            .context("opening data")
            .unwrap_err();
        assert_eq!(e.exit(), Exit::WrongKey);
        assert_eq!(format!("{e:#}"), "opening data: slot 0: wrong key");
        assert_eq!(format!("{e}"), "opening data");
    }

    #[test]
    fn io_errors_keep_the_mapping_of_the_cli() {
        let io = |kind| -> Result<(), Failure> {
            Err(std::io::Error::from(kind)).context("reading /dev/sdb")
        };
        assert_eq!(
            io(std::io::ErrorKind::NotFound).unwrap_err().exit(),
            Exit::NotFound
        );
        assert_eq!(
            io(std::io::ErrorKind::PermissionDenied).unwrap_err().exit(),
            Exit::Permission
        );
        assert_eq!(
            io(std::io::ErrorKind::UnexpectedEof).unwrap_err().exit(),
            Exit::Device
        );
    }

    #[test]
    fn errors_without_a_class_are_given_one_explicitly() {
        let e = Failure::new(Exit::Busy, "volume data is busy").context("closing");
        assert_eq!(e.exit(), Exit::Busy);
        assert_eq!(format!("{e:#}"), "closing: volume data is busy");
        let inner = anyhow::anyhow!("helper failed").context("step 3");
        let e = Failure::wrap(Exit::Failure, inner);
        assert_eq!(e.exit(), Exit::Failure);
        assert_eq!(format!("{e:#}"), "step 3: helper failed");
    }
}
