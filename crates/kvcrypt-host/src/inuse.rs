//! "Is this volume being served?" — the claim every process that serves a volume holds on its
//! backing store, and the check destructive commands (`format`, `header restore`) make before
//! they write over a header.
//!
//! Two mechanisms, because each covers what the other cannot:
//! - **`O_EXCL` on block devices.** The kernel refuses a second exclusive opener, and also a
//!   device that is mounted, an active swap area or held by device-mapper. Regular files have no
//!   such thing (`O_EXCL` without `O_CREAT` means nothing for them).
//! - **An advisory `flock`** on the backing inode (files and block devices alike). A serving
//!   process holds it shared; a destructive command asks for it exclusively and without
//!   waiting. It also names the holder: `/proc/locks` lists the pid, so the refusal can say
//!   which process serves the volume.
//!
//! The std `File::try_lock*` methods are `flock(2)` on Linux, so no `unsafe` is needed here.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kvcrypt_exit::{Exit, ExitClass};

#[derive(Debug, thiserror::Error)]
pub enum InUseError {
    /// A kvcrypt process serves the volume (it holds the shared claim).
    #[error(
        "{path} is being served{holder}; close it first (`kvcrypt close NAME`, or stop the \
         process serving it) — a served volume is never overwritten, whatever the flags"
    )]
    Served { path: PathBuf, holder: String },
    /// The kernel refused the exclusive open of a block device.
    #[error(
        "{path} is in use: mounted, an active swap area, held by device-mapper, or opened \
         exclusively by another program (a kvcrypt worker serving it, for one); unmount or \
         close it first — a busy device is never overwritten, whatever the flags"
    )]
    Exclusive { path: PathBuf },
    /// A destructive command holds the exclusive claim (a `format` or `header restore` is
    /// writing the header right now), so the volume must not be served yet.
    #[error(
        "{path} is being rewritten{holder} (kvcrypt format or header restore); try again when it has finished"
    )]
    BeingRewritten { path: PathBuf, holder: String },
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl ExitClass for InUseError {
    fn exit_class(&self) -> Exit {
        match self {
            InUseError::Served { .. }
            | InUseError::Exclusive { .. }
            | InUseError::BeingRewritten { .. } => Exit::InUse,
            InUseError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => Exit::NotFound,
                std::io::ErrorKind::PermissionDenied => Exit::Permission,
                _ => Exit::Device,
            },
        }
    }
}

/// Whether someone holds block device `path` open exclusively (a mounted filesystem, LVM, md …):
/// an `O_EXCL` open of a block device fails with EBUSY then. Close a device only when this is
/// false, or the filesystem on it sees I/O errors.
pub fn device_in_use(path: &Path) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// True if `path` is a block device (false for anything else, including errors: the open
/// that follows reports those).
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Opens `path` read-write for a command that overwrites its header: `O_EXCL` for a block
/// device, then the exclusive claim, held for as long as the returned `File` lives (so no
/// worker starts serving half-written metadata). Never waits: a busy volume is an error.
pub fn open_for_overwrite(path: &Path) -> Result<File, InUseError> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    let mut flags = libc::O_CLOEXEC;
    if is_block_device(path) {
        flags |= libc::O_EXCL;
    }
    o.custom_flags(flags);
    let f = o.open(path).map_err(|source| {
        if source.raw_os_error() == Some(libc::EBUSY) {
            InUseError::Exclusive {
                path: path.to_path_buf(),
            }
        } else {
            InUseError::Io {
                path: path.to_path_buf(),
                op: "opening for writing",
                source,
            }
        }
    })?;
    // systemd-udevd holds a shared flock on a block device for the moment it probes it (after
    // every close of a writable descriptor, see systemd.io/BLOCK_DEVICE_LOCKING), so a short
    // conflict is not a served volume: retry for a little while. A serving process holds its
    // claim for as long as it runs, so a real conflict outlasts this.
    let deadline = std::time::Instant::now() + TRANSIENT_HOLD;
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(InUseError::Served {
                    path: path.to_path_buf(),
                    holder: holders(&f),
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(InUseError::Io {
                    path: path.to_path_buf(),
                    op: "claiming exclusively",
                    source,
                });
            }
        }
    }
}

/// How long [`open_for_overwrite`] waits out a shared claim before calling the volume served.
const TRANSIENT_HOLD: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the shared "being served" claim on an open backing store. Fails only while a
/// destructive command holds the exclusive claim.
pub fn claim_served(f: &File, path: &Path) -> Result<(), InUseError> {
    match f.try_lock_shared() {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(InUseError::BeingRewritten {
            path: path.to_path_buf(),
            holder: holders(f),
        }),
        Err(TryLockError::Error(source)) => Err(InUseError::Io {
            path: path.to_path_buf(),
            op: "claiming as served",
            source,
        }),
    }
}

/// " by pid 123 (kvcrypt)" for the processes `/proc/locks` lists as holding an flock on the
/// inode of `f`, or "" if none can be named (another pid namespace, no /proc).
fn holders(f: &File) -> String {
    let Ok(meta) = f.metadata() else {
        return String::new();
    };
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return String::new();
    };
    let mut pids = holder_pids(&locks, meta.dev(), meta.ino());
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|&p| p != std::process::id());
    if pids.is_empty() {
        return String::new();
    }
    let named: Vec<String> = pids
        .iter()
        .map(
            |p| match std::fs::read_to_string(format!("/proc/{p}/comm")) {
                Ok(c) => format!("pid {p} ({})", c.trim_end()),
                Err(_) => format!("pid {p}"),
            },
        )
        .collect();
    format!(" by {}", named.join(", "))
}

/// Pids of the FLOCK entries of `/proc/locks` text on inode `ino` of device `dev`.
/// A line reads `1: FLOCK  ADVISORY  READ  1234 08:02:131 0 EOF` (major:minor in hex).
fn holder_pids(locks: &str, dev: u64, ino: u64) -> Vec<u32> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let want = |id: &str| -> bool {
        let mut it = id.split(':');
        let (Some(ma), Some(mi), Some(i), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return false;
        };
        u32::from_str_radix(ma, 16).ok() == Some(major)
            && u32::from_str_radix(mi, 16).ok() == Some(minor)
            && i.parse::<u64>().ok() == Some(ino)
    };
    locks
        .lines()
        .filter_map(|l| {
            // "1:" FLOCK ADVISORY READ|WRITE pid dev:ino start end. Waiters ("1: -> FLOCK …")
            // hold nothing, and their shifted columns never match "FLOCK" at index 1.
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"FLOCK") && f.get(5).is_some_and(|id| want(id)))
                .then(|| f.get(4)?.parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_name_the_holders_of_one_inode() {
        let dev = libc::makedev(0x08, 0x02);
        let text = "1: FLOCK  ADVISORY  READ  1234 08:02:131 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 99 08:02:131 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 77 08:02:131 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 55 08:02:132 0 EOF\n\
                    4: FLOCK  ADVISORY  READ  66 fd:02:131 0 EOF\n\
                    garbage\n";
        assert_eq!(holder_pids(text, dev, 131), vec![1234]);
        assert_eq!(holder_pids(text, dev, 7), Vec::<u32>::new());
    }

    #[test]
    fn a_served_file_is_refused_and_named_and_freed_when_the_server_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vol.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        // Another open file description stands for the serving process: flock conflicts
        // between descriptions, even in one process.
        let server = File::open(&p).unwrap();
        claim_served(&server, &p).unwrap();
        let e = open_for_overwrite(&p).unwrap_err();
        assert!(matches!(e, InUseError::Served { .. }), "{e}");
        assert_eq!(e.exit_class(), Exit::InUse);
        assert!(e.to_string().contains("is being served"), "{e}");
        // While a destructive command holds its claim, serving is refused.
        drop(server);
        let writer = open_for_overwrite(&p).unwrap();
        let late = File::open(&p).unwrap();
        let e = claim_served(&late, &p).unwrap_err();
        assert!(matches!(e, InUseError::BeingRewritten { .. }), "{e}");
        drop(writer);
        claim_served(&late, &p).unwrap();
    }
}
