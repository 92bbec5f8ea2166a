//! Descriptors a process is handed by number: by the service manager (`LISTEN_FDS`, the file
//! descriptor store) or, for a worker, by the process that started it (the key on fd 3, the
//! ready pipe, the /dev/fuse descriptors of a takeover).

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Takes ownership of the inherited descriptor `fd`, close-on-exec from now on. Fails, owning
/// nothing, if `fd` is not an open descriptor.
///
/// # Safety
/// `fd` must have been handed to this process for its exclusive use, and be taken only once:
/// nothing else may own or close it.
pub unsafe fn take(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: the number is only borrowed to ask whether it is open (F_GETFD); the caller
    // vouches that nothing closes it meanwhile.
    rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) })?;
    // SAFETY: `fd` is open, and the caller hands it over exclusively (see above).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn an_open_descriptor_is_taken_and_a_closed_one_refused() {
        let (r, _w) = rustix::pipe::pipe().unwrap();
        let raw = r.into_raw_fd();
        // SAFETY: `raw` came from into_raw_fd just above; nothing else owns it.
        let taken = unsafe { take(raw) }.unwrap();
        let flags = rustix::io::fcntl_getfd(&taken).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        // A number far above any descriptor limit is never open (a just-closed number could
        // be reused by a test running alongside).
        // SAFETY: that number is not open, so there is nothing to own.
        let e = unsafe { take(0x3fff_fff0) }.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }
}
