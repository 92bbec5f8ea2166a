//! sd_notify: READY=1, STATUS=…, WATCHDOG=1, STOPPING=1 over $NOTIFY_SOCKET.
//!
//! Hand-written (a dozen lines over a datagram socket) rather than a crate: the protocol is
//! one datagram, optionally with descriptors attached (the fd store, `super::fdstore`).

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use rustix::net::SocketAddrUnix;

use crate::worker::fdpass;

/// Where notifications go; `None` when not started by systemd (then every call is a no-op).
#[derive(Debug, Clone)]
pub struct Notifier {
    path: Option<String>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`.
    pub fn from_env() -> Self {
        Self {
            path: std::env::var("NOTIFY_SOCKET")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }

    /// Sends to `path` (`@name`: abstract socket) or nowhere.
    #[cfg(test)]
    pub(super) fn at(path: Option<String>) -> Self {
        Self { path }
    }

    pub fn enabled(&self) -> bool {
        self.path.is_some()
    }

    /// Sends one datagram of `KEY=VALUE` lines.
    pub fn send(&self, msg: &str) -> io::Result<()> {
        self.send_with_fds(msg, &[])
    }

    /// Sends one datagram with `fds` attached (`FDSTORE=1`, sd_pid_notify_with_fds(3)).
    pub fn send_with_fds(&self, msg: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let addr = match path.strip_prefix('@') {
            Some(abs) => SocketAddrUnix::new_abstract_name(abs.as_bytes())?,
            None => SocketAddrUnix::new(path.as_str())?,
        };
        let sock = UnixDatagram::unbound()?;
        fdpass::send_to_with_fds(&sock, &addr, msg.as_bytes(), fds)?;
        Ok(())
    }

    pub fn ready(&self, status: &str) {
        self.log(self.send(&format!("READY=1\nSTATUS={}", one_line(status))));
    }
    pub fn status(&self, status: &str) {
        self.log(self.send(&format!("STATUS={}", one_line(status))));
    }
    /// `systemctl reload` in progress; [`Notifier::ready`] ends it. (No `MONOTONIC_USEC`: only
    /// `Type=notify-reload`, systemd 253+, needs it; the unit uses `ExecReload=kill -HUP`.)
    pub fn reloading(&self) {
        self.log(self.send("RELOADING=1\nSTATUS=reloading the configuration"));
    }
    pub fn watchdog(&self) {
        self.log(self.send("WATCHDOG=1"));
    }
    pub fn stopping(&self) {
        self.log(self.send("STOPPING=1\nSTATUS=stopping"));
    }

    fn log(&self, r: io::Result<()>) {
        if let Err(e) = r {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// Half of `$WATCHDOG_USEC` when the watchdog is enabled for this process.
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;

    #[test]
    fn sends_to_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify");
        let rx = UnixDatagram::bind(&p).unwrap();
        let n = Notifier {
            path: Some(p.display().to_string()),
        };
        n.ready("serving 2/2\nvolumes");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving 2/2 volumes");

        let name = format!("kvcrypt-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx2 = UnixDatagram::bind_addr(&addr).unwrap();
        let n2 = Notifier {
            path: Some(format!("@{name}")),
        };
        n2.watchdog();
        let len = rx2.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");

        let off = Notifier { path: None };
        assert!(!off.enabled());
        off.send("READY=1").unwrap();
    }
}
