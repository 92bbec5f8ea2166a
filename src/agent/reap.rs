//! A worker's death at the OS level: noticing it at once (a pidfd, which works for workers the
//! agent did not start too, e.g. adopted ones) and detaching the loop device a dead FUSE worker
//! left bound to its dead FUSE file.
//!
//! `pidfd_open` and `pidfd_send_signal` through rustix; tokio's `AsyncFd` does the waiting. The
//! loop ioctls live in `transport::loopdev`.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

/// An open pidfd: becomes readable when the process has exited.
#[derive(Debug)]
pub struct PidWatch {
    fd: OwnedFd,
    pid: u32,
}

impl PidWatch {
    /// Opens a pidfd for `pid`. `ESRCH` means the process is already gone.
    pub fn open(pid: u32) -> io::Result<PidWatch> {
        let p = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        let fd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())?;
        Ok(PidWatch { fd, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends SIGKILL to exactly this process (a pidfd cannot hit a recycled pid).
    pub fn kill(&self) -> io::Result<()> {
        Ok(rustix::process::pidfd_send_signal(
            &self.fd,
            rustix::process::Signal::KILL,
        )?)
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

/// The label (`lo_file_name`) of loop device `dev`; `None` if it is not bound to a file. The
/// FUSE transport labels its devices `kvcrypt:NAME`. (Its sysfs `backing_file` is no help once
/// the worker is dead: the FUSE mount lived in the worker's private namespace, and a file on a
/// mount whose namespace is gone shows as "/".)
pub fn loop_label(dev: &Path) -> io::Result<Option<String>> {
    kvcrypt_datapath::transport::loopdev::label(dev)
}

/// Detaches loop device `loop_dev` if it is still bound to the FUSE file of volume `name`,
/// whose worker died (label `kvcrypt:NAME`, see [`loop_label`]; call this before a new worker
/// of the volume starts). A device nobody holds open goes at once; one that is still open
/// (mounted, held by a process) is detached by the kernel on its last close (autoclear).
/// Returns what happened, for the log; never touches a loop device bound to anything else.
pub fn detach_dead_fuse_loop(loop_dev: &Path, name: &str) -> String {
    let dev = loop_dev.display();
    let is_loop = loop_dev
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("loop"));
    if !is_loop {
        return format!("{dev} is not a loop device");
    }
    let want = kvcrypt_datapath::transport::fuse::loop_label(name);
    let ours = |d: &Path| loop_label(d).is_ok_and(|l| l.as_deref() == Some(want.as_str()));
    if !ours(loop_dev) {
        return format!("{dev} was already detached");
    }
    let err = kvcrypt_datapath::transport::loopdev::detach(loop_dev).err();
    match (err, ours(loop_dev)) {
        (_, false) => format!("detached {dev}"),
        (None, true) => format!(
            "{dev} is still open (mounted or held by a process): the kernel detaches it on its last close"
        ),
        (Some(e), true) => format!("cannot detach {dev}: {e}"),
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

    #[tokio::test]
    async fn kill_through_the_pidfd_ends_exactly_that_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let w = PidWatch::open(child.id()).unwrap();
        w.kill().unwrap();
        w.exited().await.unwrap();
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn gone_process_is_esrch_and_other_devices_are_left_alone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let e = PidWatch::open(pid).map(|_| ()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
        let msg = detach_dead_fuse_loop(Path::new("/dev/sda"), "x");
        assert!(msg.contains("not a loop device"), "{msg}");
    }
}
