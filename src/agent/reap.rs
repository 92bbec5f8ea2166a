//! A worker's death at the OS level: noticing it at once (a pidfd, which works for workers the
//! agent did not start too, e.g. adopted ones) and detaching the loop device a dead FUSE worker
//! left bound to its dead FUSE file.
//!
//! Hand-written rather than from a crate: two syscalls (`pidfd_open`, `LOOP_CLR_FD`) that `libc`
//! already declares; tokio's `AsyncFd` does the waiting.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// `LOOP_CLR_FD` from `<linux/loop.h>`.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;

/// An open pidfd: becomes readable when the process has exited.
#[derive(Debug)]
pub struct PidWatch {
    fd: OwnedFd,
    pid: u32,
}

impl PidWatch {
    /// Opens a pidfd for `pid`. `ESRCH` means the process is already gone.
    pub fn open(pid: u32) -> io::Result<PidWatch> {
        let p =
            libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
        // pointers are involved.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = i32::try_from(r).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: `raw` is a descriptor the kernel just gave us, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(PidWatch { fd, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the process has exited (all its threads). Needs a tokio runtime.
    pub async fn exited(self) -> io::Result<()> {
        // SAFETY: the OwnedFd moves into the AsyncFd, so the descriptor stays open and the
        // same for the AsyncFd's whole life (tokio's registration requirement).
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self.fd, tokio::io::Interest::READABLE)
        }?;
        let _guard = afd.readable().await?;
        Ok(())
    }
}

/// Detaches `/dev/loopN` if it is still bound to a file under `fuse_file` (the FUSE file of a
/// dead worker). A device nobody holds open goes at once; one that is still open (mounted,
/// held by a process) is detached by the kernel on its last close (autoclear). Returns what
/// happened, for the log; never touches a loop device bound to anything else.
pub fn detach_dead_fuse_loop(loop_dev: &Path, fuse_file: &Path) -> String {
    let Some(name) = loop_dev.file_name().and_then(|n| n.to_str()) else {
        return format!("{} is not a loop device", loop_dev.display());
    };
    if !name.starts_with("loop") {
        return format!("{} is not a loop device", loop_dev.display());
    }
    let sys = Path::new("/sys/block").join(name).join("loop/backing_file");
    let backing = match std::fs::read_to_string(&sys) {
        Ok(b) => b.trim().to_owned(),
        Err(_) => return format!("{} was already detached", loop_dev.display()),
    };
    if !Path::new(&backing).starts_with(fuse_file) {
        return format!(
            "{} was already detached (now bound to {backing})",
            loop_dev.display()
        );
    }
    let f = match std::fs::OpenOptions::new().read(true).open(loop_dev) {
        Ok(f) => f,
        Err(e) => return format!("cannot open {} to detach it: {e}", loop_dev.display()),
    };
    // SAFETY: LOOP_CLR_FD takes no argument; `f` is an open loop device descriptor.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD as _, 0) };
    let err = (r != 0).then(io::Error::last_os_error);
    drop(f);
    let still =
        std::fs::read_to_string(&sys).is_ok_and(|b| Path::new(b.trim()).starts_with(fuse_file));
    match (err, still) {
        (_, false) => format!("detached {}", loop_dev.display()),
        (None, true) => format!(
            "{} is still open (mounted or held by a process): the kernel detaches it on its last close",
            loop_dev.display()
        ),
        (Some(e), true) => format!("cannot detach {}: {e}", loop_dev.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pidfd_resolves_when_the_process_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let w = PidWatch::open(child.id()).unwrap();
        assert_eq!(w.pid(), child.id());
        let waiting = tokio::spawn(w.exited());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the process is still running");
        child.kill().unwrap();
        waiting.await.unwrap().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn gone_process_is_esrch_and_other_devices_are_left_alone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let e = PidWatch::open(pid).map(|_| ()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
        let msg = detach_dead_fuse_loop(Path::new("/dev/sda"), Path::new("/run/kvcrypt/fuse/x"));
        assert!(msg.contains("not a loop device"), "{msg}");
    }
}
