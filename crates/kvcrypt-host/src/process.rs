//! Processes by pid: whether one exists, and signalling one (a worker we started, or the pid a
//! state file or the ublk driver records). Through rustix, so no `unsafe` of our own.

use std::io;

use rustix::process::{Pid, Signal};

fn pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .and_then(Pid::from_raw)
}

/// True if a process with this pid exists (signal 0: nothing is sent). A process we may not
/// signal (EPERM) exists too.
pub fn pid_alive(p: u32) -> bool {
    let Some(p) = pid(p) else {
        return false;
    };
    match rustix::process::test_kill_process(p) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

/// Sends signal `sig` (e.g. `libc::SIGTERM`) to process `p`.
pub fn signal(p: u32, sig: i32) -> io::Result<()> {
    let p = pid(p).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    let sig =
        Signal::from_named_raw(sig).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    rustix::process::kill_process(p, sig).map_err(io::Error::from)
}

/// Whether this process runs as root (effective uid 0).
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// This process's effective uid.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_and_signal() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(pid_alive(child.id()));
        signal(child.id(), libc::SIGKILL).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(!pid_alive(child.id()));
        assert_eq!(
            signal(0, libc::SIGTERM).unwrap_err().raw_os_error(),
            Some(libc::ESRCH)
        );
    }
}
