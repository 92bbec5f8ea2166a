//! Making a served device's `/dev/disk/by-kvcrypt/NAME` exist before anyone is told the volume
//! is served.
//!
//! With udev running, the link is udev's: `60-kvcrypt.rules` names loop and ublk devices through
//! `kvcrypt udev-name`, which reads the worker's state file — written only after the kernel's own
//! add/change event for the device, so that event found no name and the spawner must trigger a
//! new one. Until udev has processed it there is no link, and no systemd device unit for it
//! either (fstab's `/dev/disk/by-kvcrypt/NAME`, `x-systemd.requires=`): reporting `serving` or
//! printing the device before that sent callers to a path that did not exist yet (~1 s in the
//! VM). Without udev the worker makes the link itself (`link_by_name`) before its ready line.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::BY_KVCRYPT_DIR;

/// How long a spawn waits for udev to name the new device.
pub const UDEV_NAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether udev runs here (its control socket exists).
pub fn udev_running() -> bool {
    Path::new("/run/udev/control").exists()
}

/// Returns once `/dev/disk/by-kvcrypt/NAME` resolves to `block_device`: with udev, after
/// `udevadm trigger --action=change --settle` and a bounded wait for the link
/// ([`UDEV_NAME_TIMEOUT`] in all). If the trigger fails, or udev does not name the device in
/// time, logs why and makes the link itself (as without udev), so the caller can go on.
/// Without udev there is nothing to wait for: the worker made the link before it reported
/// ready. Blocks; used by every caller that starts a worker (the agent, `kvcrypt open`,
/// `kvcrypt attach` without an agent).
pub fn wait_until_named(name: &str, block_device: &Path) {
    let host = Udev {
        control: Path::new("/run/udev/control"),
        udevadm: Path::new("udevadm"),
        by_name: Path::new(BY_KVCRYPT_DIR),
        timeout: UDEV_NAME_TIMEOUT,
    };
    host.wait_until_named(name, block_device);
}

/// Where [`wait_until_named`] finds udev and the links (tests stand in for each).
struct Udev<'a> {
    control: &'a Path,
    udevadm: &'a Path,
    by_name: &'a Path,
    timeout: Duration,
}

impl Udev<'_> {
    fn wait_until_named(&self, name: &str, block_device: &Path) {
        if !self.control.exists() {
            return;
        }
        let deadline = Instant::now() + self.timeout;
        let failure = match trigger_change(self.udevadm, block_device, self.timeout) {
            // No event of ours is coming: waiting would only delay the volume. (Another
            // event, e.g. udev's inotify watch on a loop device, may still make udev's link
            // later; it then replaces ours, with the same target.)
            Err(e) => format!("udevadm trigger failed: {e}"),
            Ok(()) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match wait_for_link(self.by_name, name, block_device, left) {
                    Ok(()) => return,
                    Err(seen) => format!(
                        "udev processed the change event but made no link within {} ms \
                         ({seen}); are 60-kvcrypt.rules installed, and does `kvcrypt \
                         udev-name` name the device?",
                        self.timeout.as_millis()
                    ),
                }
            }
        };
        let link = self.by_name.join(name);
        tracing::warn!(volume = name, block_device = %block_device.display(),
            "volume {name}: udev did not name {} as {}: {failure}; making the link without udev",
            block_device.display(), link.display());
        if let Err(e) = super::run::link_in(self.by_name, name, block_device) {
            tracing::warn!(
                volume = name,
                "volume {name}: cannot create {}: {e}",
                link.display()
            );
        }
    }
}

/// Waits until `dir/name` resolves to `target` (both canonicalized, so a link to a link or a
/// relative link counts). On timeout says what was there instead.
pub fn wait_for_link(
    dir: &Path,
    name: &str,
    target: &Path,
    timeout: Duration,
) -> Result<(), String> {
    let link = dir.join(name);
    let want = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_owned());
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::canonicalize(&link).is_ok_and(|p| p == want) {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(match std::fs::read_link(&link) {
                Ok(t) => format!("{} points to {}", link.display(), t.display()),
                Err(_) => format!("no {}", link.display()),
            });
        }
        std::thread::sleep(Duration::from_millis(20).min(deadline - now));
    }
}

fn trigger_command(udevadm: &Path, dev: &Path) -> Command {
    let mut cmd = Command::new(udevadm);
    for var in super::SERVICE_MANAGER_VARS {
        cmd.env_remove(var);
    }
    cmd.args(["trigger", "--action=change", "--settle"])
        .arg(dev);
    cmd
}

/// `udevadm trigger --action=change --settle DEV` (udev re-runs the rules for the device and
/// the command returns once that is done), bounded by `timeout`.
fn trigger_change(udevadm: &Path, dev: &Path, timeout: Duration) -> Result<(), String> {
    let mut child = trigger_command(udevadm, dev)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run udevadm: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", timeout.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    // e.g. EROFS writing the device's uevent file when /sys is read-only for the caller
    // (systemd's ProtectKernelTunables=).
    Err(format!("{status}: {}", err.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_the_link_to_name_the_device() {
        let d = tempfile::tempdir().unwrap();
        let by_name = d.path().join("by-kvcrypt");
        std::fs::create_dir(&by_name).unwrap();
        let dev = d.path().join("loop7");
        std::fs::write(&dev, b"").unwrap();
        // udev makes the link a little later (a relative one, as udev does).
        let dir2 = by_name.clone();
        let maker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            std::os::unix::fs::symlink("../loop7", dir2.join("data")).unwrap();
        });
        let t0 = Instant::now();
        wait_for_link(&by_name, "data", &dev, Duration::from_secs(5)).unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(150),
            "returned before the link existed"
        );
        maker.join().unwrap();
    }

    /// A temp dir standing in for /run/udev, /dev/disk/by-kvcrypt and the device, and a fake
    /// `udevadm` script.
    struct Stage {
        dir: tempfile::TempDir,
    }

    impl Stage {
        fn new(udevadm_script: &str) -> Stage {
            use std::os::unix::fs::PermissionsExt;
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("control"), b"").unwrap();
            std::fs::write(dir.path().join("ublkb0"), b"").unwrap();
            let script = dir.path().join("udevadm");
            std::fs::write(&script, format!("#!/bin/sh\n{udevadm_script}\n")).unwrap();
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
            Stage { dir }
        }
        fn p(&self, rel: &str) -> std::path::PathBuf {
            self.dir.path().join(rel)
        }
        /// Runs the real logic against the stage; returns how long it took.
        fn run(&self, timeout: Duration) -> Duration {
            let (control, udevadm, by_name) = (self.p("control"), self.p("udevadm"), self.p("by"));
            let u = Udev {
                control: &control,
                udevadm: &udevadm,
                by_name: &by_name,
                timeout,
            };
            let t0 = Instant::now();
            u.wait_until_named("data", &self.p("ublkb0"));
            t0.elapsed()
        }
        fn link(&self) -> Option<std::path::PathBuf> {
            std::fs::read_link(self.p("by/data")).ok()
        }
    }

    #[test]
    fn returns_once_udev_made_the_link_after_the_settled_trigger() {
        // udev (here: a background job of the fake udevadm) names the device a little after
        // `trigger --settle` returned; the caller must not return before the link exists.
        let s = Stage::new(
            "case \"$*\" in *--settle*) ;; *) exit 2;; esac\n\
             d=$(dirname \"$0\")\n\
             (sleep 0.3; mkdir -p \"$d/by\"; ln -s ../ublkb0 \"$d/by/data\") &",
        );
        let took = s.run(Duration::from_secs(5));
        assert_eq!(
            s.link().as_deref(),
            Some(Path::new("../ublkb0")),
            "udev's link kept"
        );
        assert!(
            took >= Duration::from_millis(300),
            "returned after {took:?}"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn udevadm_gets_none_of_the_agents_service_manager_variables() {
        let cmd = trigger_command(Path::new("udevadm"), Path::new("/dev/ublkb0"));
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        for var in super::super::SERVICE_MANAGER_VARS {
            assert!(removed.iter().any(|r| r == var), "{var} passed to udevadm");
        }
    }

    #[test]
    fn a_failing_trigger_makes_the_link_at_once() {
        // What udevadm says when /sys is read-only for it (systemd ProtectKernelTunables=).
        let s = Stage::new(
            "echo \"Failed to write 'change' to '/sys/devices/virtual/block/ublkb0/uevent': \
             Read-only file system\" >&2; exit 1",
        );
        let took = s.run(Duration::from_secs(5));
        assert_eq!(s.link(), Some(s.p("ublkb0")));
        assert!(took < Duration::from_secs(2), "waited {took:?} for nothing");
    }

    #[test]
    fn no_link_from_udev_within_the_bound_makes_it_by_hand() {
        let s = Stage::new("exit 0");
        let took = s.run(Duration::from_millis(300));
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert_eq!(s.link(), Some(s.p("ublkb0")));
    }

    #[test]
    fn without_udev_nothing_runs_and_nothing_is_made() {
        let s = Stage::new("touch \"$(dirname \"$0\")/ran\"");
        std::fs::remove_file(s.p("control")).unwrap();
        s.run(Duration::from_secs(5));
        assert!(!s.p("ran").exists(), "udevadm ran without udev");
        assert_eq!(s.link(), None, "the worker makes the link itself then");
    }

    #[test]
    fn a_missing_or_wrong_link_times_out_saying_what_is_there() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("ublkb0");
        let other = d.path().join("loop0");
        std::fs::write(&dev, b"").unwrap();
        std::fs::write(&other, b"").unwrap();
        let t0 = Instant::now();
        let e = wait_for_link(d.path(), "data", &dev, Duration::from_millis(100)).unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert!(e.starts_with("no ") && e.ends_with("/data"), "{e}");
        // A stale link to another device (a previous worker's) does not count.
        std::os::unix::fs::symlink(&other, d.path().join("data")).unwrap();
        let e = wait_for_link(d.path(), "data", &dev, Duration::from_millis(60)).unwrap_err();
        assert!(e.contains("points to") && e.contains("loop0"), "{e}");
    }
}
