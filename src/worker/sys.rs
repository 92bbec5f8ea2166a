//! The few raw system calls of the worker model (pipes, fd plumbing for the child, signals,
//! peer credentials). All `unsafe` of `crate::worker` lives here.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A close-on-exec pipe whose ends are moved to descriptors >= 10, so they can never collide
/// with the fixed numbers (3, 4) they are dup2'ed to in the child.
pub fn pipe_high() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((dup_high(&r)?, dup_high(&w)?))
}

fn dup_high(fd: &OwnedFd) -> io::Result<OwnedFd> {
    dup_at_least(fd, 10)
}

/// A close-on-exec duplicate of `fd` numbered `min` or higher.
pub fn dup_at_least(fd: &OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC duplicates a valid descriptor to the lowest free one >= min.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min.max(10)) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: n is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
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
pub fn poll_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        return Ok(r > 0);
    }
}

/// Takes ownership of an inherited descriptor number (key fd / ready fd of the worker).
/// Fails if the number is not an open descriptor.
pub fn take_fd(fd: RawFd) -> io::Result<File> {
    // SAFETY: F_GETFD only queries the descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open and was handed to this process for its exclusive use
    // (by spawn_worker or the caller of `kvcrypt worker`); we take it over once.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Uid of the process at the other end of a Unix socket.
pub fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one ucred of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
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
