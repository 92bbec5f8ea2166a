//! The few raw OS calls the ublk transport needs (kept here so `unsafe` stays in one small place).

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::mountinfo::NamespaceError;

/// Moves the calling thread (and every thread it spawns afterwards) into a new mount namespace
/// whose mounts are all private, and detaches every ublk-backed mount from that copy.
///
/// Why: a ublk server must not share a mount namespace with a filesystem mounted on a ublk
/// device. A mount of its own device in its own namespace keeps the filesystem alive after the
/// user unmounted it elsewhere; deleting the device then waits for that mount, which only goes
/// away when the server exits — the known libublk deadlock (seen in the VM: `close` after a
/// recovery hung). Private propagation keeps the host's later mounts out of our copy; mounts
/// that already existed (a worker recovering a mounted device) are lazily unmounted here.
pub fn isolate_mount_namespace() -> Result<(), NamespaceError> {
    crate::mountinfo::unshare_private_namespace()?;
    crate::mountinfo::detach_mounts(|m| is_ublk_devno(&m.devno)).map_err(NamespaceError::MountTable)
}

/// Whether block device MAJ:MIN is a ublk disk or one of its partitions.
fn is_ublk_devno(devno: &str) -> bool {
    std::fs::read_link(format!("/sys/dev/block/{devno}"))
        .ok()
        .and_then(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with("ublkb"))
        })
        .unwrap_or(false)
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

/// Whether a process with this pid exists (signal 0 probes without sending anything).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 performs only the existence/permission check.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Ends the process immediately, without running destructors or exit handlers.
///
/// Used on kernels without `UBLK_F_QUIESCE`: the only safe way to hand a device over to a later
/// server is for this one to disappear — libublk's queue `Drop` would wait forever for the FETCH
/// commands the kernel still holds. Process exit closes the io_uring, the kernel cancels those
/// commands and the device goes QUIESCED with its requests kept for re-issue.
pub fn exit_immediately(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it never returns.
    unsafe { libc::_exit(code) }
}
