//! The few raw OS calls the ublk transport needs (kept here so `unsafe` stays in one small place).

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
