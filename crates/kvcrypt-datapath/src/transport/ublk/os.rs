//! The few raw OS calls the ublk transport needs (kept here so `unsafe` stays in one small place).

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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
