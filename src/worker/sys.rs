//! The system calls of the worker model: pipes, fd plumbing for the child, signals, peer
//! credentials. Through rustix where it has them; the `unsafe` left (descriptors between fork
//! and exec, inherited descriptor numbers, signal masks, which rustix does not offer) is all
//! of `crate::worker`'s.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A close-on-exec pipe whose ends are moved to descriptors >= 10, so they can never collide
/// with the fixed numbers (3, 4) they are dup2'ed to in the child.
pub fn pipe_high() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    Ok((dup_at_least(&r, 10)?, dup_at_least(&w, 10)?))
}

/// A close-on-exec duplicate of `fd` numbered `min` (at least 10) or higher.
pub fn dup_at_least(fd: &OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, min.max(10))?)
}

/// In the child between fork and exec: new session (detached from the terminal and the
/// caller's process group), and `src` descriptors placed at `dst` without close-on-exec.
///
/// # Safety
/// Must only be called from `CommandExt::pre_exec` (async-signal-safe calls only).
pub unsafe fn child_setup(map: &[(RawFd, RawFd)]) -> io::Result<()> {
    // SAFETY: setsid/dup2 are async-signal-safe; descriptors are valid in the child.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        for &(src, dst) in map {
            if libc::dup2(src, dst) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Waits up to `timeout` for `fd` to become readable (or hang up). Ok(false) on timeout.
pub fn poll_readable(fd: impl AsFd, timeout: Duration) -> io::Result<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 0,
    });
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    loop {
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(n) => return Ok(n > 0),
        }
    }
}

/// Takes ownership of an inherited descriptor number (key fd / ready fd of the worker).
/// Fails if the number is not an open descriptor.
pub fn take_fd(fd: RawFd) -> io::Result<File> {
    // SAFETY: the descriptor was handed to this process for its exclusive use (by
    // spawn_worker or the caller of `kvcrypt worker`); each number is taken over once.
    Ok(File::from(unsafe { kvcrypt_host::inherited::take(fd) }?))
}

/// Uid of the process at the other end of a Unix socket.
pub fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    Ok(rustix::net::sockopt::socket_peercred(s)?.uid.as_raw())
}

pub use kvcrypt_host::process::{euid, pid_alive, signal};

/// Blocks SIGTERM/SIGINT/SIGHUP in the calling thread (and threads it spawns later), so that
/// [`wait_termination`] can take them synchronously.
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: valid sigset; old set not requested.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits for one of the blocked termination signals; returns its number.
pub fn wait_termination() -> i32 {
    let set = termination_set();
    let mut sig = 0;
    // SAFETY: valid sigset and output pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset uses it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}
