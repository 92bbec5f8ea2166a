//! The few raw OS calls the ublk transport needs (kept here so `unsafe` stays in one small place).

use std::io;

/// Moves the calling thread (and every thread it spawns afterwards) into a new mount namespace
/// whose mounts are all private.
///
/// Why: a ublk server must not share a mount namespace with a filesystem mounted on its own
/// device — when the server exits, tearing down that namespace's mounts needs I/O the dead server
/// can no longer serve, and libublk documents the resulting deadlock. Private propagation keeps
/// the host's later mounts (e.g. `mount /dev/ublkb0 /mnt`) out of our copy.
pub fn isolate_mount_namespace() -> io::Result<()> {
    // SAFETY: unshare takes only flags; CLONE_NEWNS affects the calling thread's fs/namespace
    // state only (CLONE_FS is implied), which is allowed in a multi-threaded process.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all pointer arguments are NUL-terminated static strings or null; with MS_REC |
    // MS_PRIVATE mount(2) only changes propagation of the (now private to us) mount tree.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
