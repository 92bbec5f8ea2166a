//! The FUSE connections the agent holds, in systemd's file descriptor store.
//!
//! The agent keeps duplicates of every FUSE worker's /dev/fuse descriptors so that a worker's
//! death does not end its connection (see `transport::fuse`). When the agent dies *with* its
//! workers (`systemctl kill kvcrypt-agent`, an OOM kill of the cgroup) its own copies go too;
//! the copies it pushed into systemd's store (`FDSTORE=1`, `FDNAME=` on `$NOTIFY_SOCKET`,
//! sd_pid_notify_with_fds(3)) survive the restart (`Restart=on-failure`; the store is only
//! emptied once the service is fully stopped with no job pending) and come back to the next
//! agent as `$LISTEN_FDS` / `$LISTEN_FDNAMES` (sd_listen_fds_with_names(3)). systemd drops a
//! stored descriptor by itself when it polls POLLERR, which /dev/fuse does once its
//! connection is aborted; the agent removes a volume's descriptors (`FDSTOREREMOVE=1`) when it
//! lets go of the connection on purpose, or the connection could never end.
//!
//! Names: `fuse-CONN-NAME` (CONN: the fusectl connection number, recorded in the worker's
//! state file, so descriptors of an older connection of the same volume are never taken for
//! the current one; NAME: the volume, which cannot contain the ':' that separates names).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use super::notify::Notifier;
use crate::worker::fdpass;

/// `FDNAME=` of volume `name`'s descriptors on connection `conn`.
pub fn fd_name(name: &str, conn: u64) -> String {
    format!("fuse-{conn}-{name}")
}

/// The volume and connection of a name made by [`fd_name`].
pub fn parse_fd_name(fdname: &str) -> Option<(String, u64)> {
    let rest = fdname.strip_prefix("fuse-")?;
    let (conn, name) = rest.split_once('-')?;
    Some((name.to_owned(), conn.parse().ok()?))
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The descriptors the service manager passed to this process, with their names
/// (sd_listen_fds_with_names(3): `LISTEN_PID` must be ours, `LISTEN_FDS` of them from fd 3 on,
/// `LISTEN_FDNAMES` colon-separated). Taken once per process; each is made close-on-exec so no
/// worker or hook inherits it. Empty when not started that way.
pub fn take_listen_fds() -> Vec<(String, OwnedFd)> {
    let env = |k| std::env::var(k).ok();
    let mine = env("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let n: i32 = env("LISTEN_FDS").and_then(|n| n.parse().ok()).unwrap_or(0);
    if !mine || n <= 0 || TAKEN.swap(true, Ordering::SeqCst) {
        return Vec::new();
    }
    let names = env("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    let mut out = Vec::new();
    for fd in 3..3 + n {
        let name = names.next().unwrap_or("unknown").to_owned();
        match take(fd) {
            Ok(f) => out.push((name, f)),
            Err(e) => {
                tracing::warn!(fd, name, error = %e, "descriptor {fd} ({name}) from the service manager is unusable: {e}")
            }
        }
    }
    out
}

fn take(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: the service manager passed this descriptor to this process (LISTEN_PID is ours)
    // and it is taken over exactly once (TAKEN), so nothing else owns or closes it.
    unsafe { kvcrypt_host::inherited::take(fd) }
}

/// `$NOTIFY_SOCKET`, for the fd store messages (not started by systemd: every call is a no-op,
/// then only the agent's own copies exist).
#[derive(Debug, Clone)]
pub struct FdStore {
    notify: Notifier,
}

impl FdStore {
    pub fn from_env() -> FdStore {
        FdStore {
            notify: Notifier::from_env(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.notify.enabled()
    }

    /// Stores `fds` under `fdname` (in several messages if there are more than one carries).
    pub fn store(&self, fdname: &str, fds: &[impl AsFd]) -> io::Result<()> {
        let all: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        for chunk in all.chunks(fdpass::MAX_FDS_PER_MESSAGE) {
            self.notify
                .send_with_fds(&format!("FDSTORE=1\nFDNAME={fdname}"), chunk)?;
        }
        Ok(())
    }

    /// Removes every descriptor stored under `fdname`.
    pub fn remove(&self, fdname: &str) -> io::Result<()> {
        self.notify
            .send(&format!("FDSTOREREMOVE=1\nFDNAME={fdname}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_volume_names_may_contain_dashes() {
        let n = fd_name("data-1.x", 57);
        assert_eq!(n, "fuse-57-data-1.x");
        assert_eq!(parse_fd_name(&n), Some(("data-1.x".into(), 57)));
        assert_eq!(parse_fd_name("control"), None);
        assert_eq!(parse_fd_name("fuse-x-data"), None);
    }

    #[test]
    fn stores_and_removes_over_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&p).unwrap();
        let st = FdStore {
            notify: Notifier::at(Some(p.display().to_string())),
        };
        let f = tempfile::tempfile().unwrap();
        st.store("fuse-1-v", &[&f, &f]).unwrap();
        let mut buf = [0u8; 256];
        let (n, fds) = fdpass::recv_with_fds(&rx, &mut buf, 8).unwrap();
        assert_eq!(&buf[..n], b"FDSTORE=1\nFDNAME=fuse-1-v");
        assert_eq!(fds.len(), 2);
        st.remove("fuse-1-v").unwrap();
        let (n, fds) = fdpass::recv_with_fds(&rx, &mut buf, 8).unwrap();
        assert_eq!(&buf[..n], b"FDSTOREREMOVE=1\nFDNAME=fuse-1-v");
        assert!(fds.is_empty());
        assert!(
            !FdStore {
                notify: Notifier::at(None)
            }
            .enabled()
        );
    }
}
