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

use super::{BY_KVCRYPT_DIR, link_by_name};

/// How long a spawn waits for udev to name the new device.
pub const UDEV_NAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether udev runs here (its control socket exists).
pub fn udev_running() -> bool {
    Path::new("/run/udev/control").exists()
}

/// Returns once `/dev/disk/by-kvcrypt/NAME` resolves to `block_device`: with udev, after
/// `udevadm trigger --action=change --settle` and a bounded wait for the link ([`UDEV_NAME_TIMEOUT`]
/// in all). If udev does not name it in time, logs why and makes the link itself (as without
/// udev), so the caller can go on. Without udev there is nothing to wait for: the worker made
/// the link before it reported ready. Blocks; used by every caller that starts a worker
/// (the agent, `kvcrypt open`, `kvcrypt attach` without an agent).
pub fn wait_until_named(name: &str, block_device: &Path) {
    if !udev_running() {
        return;
    }
    let deadline = Instant::now() + UDEV_NAME_TIMEOUT;
    let triggered = trigger_change(block_device, UDEV_NAME_TIMEOUT);
    let left = deadline.saturating_duration_since(Instant::now());
    let Err(seen) = wait_for_link(Path::new(BY_KVCRYPT_DIR), name, block_device, left) else {
        return;
    };
    let cause = match triggered {
        Err(e) => format!("udevadm trigger failed: {e}"),
        Ok(()) => "udev processed the change event but made no link; are 60-kvcrypt.rules \
                   installed, and does `kvcrypt udev-name` name the device?"
            .to_owned(),
    };
    tracing::warn!(volume = name, block_device = %block_device.display(),
        "volume {name}: udev did not name {} as {BY_KVCRYPT_DIR}/{name} within {} s ({seen}): {cause}; \
         making the link without udev",
        block_device.display(), UDEV_NAME_TIMEOUT.as_secs());
    if let Err(e) = link_by_name(name, block_device) {
        tracing::warn!(
            volume = name,
            "volume {name}: cannot create {BY_KVCRYPT_DIR}/{name}: {e}"
        );
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

/// `udevadm trigger --action=change --settle DEV` (udev re-runs the rules for the device and
/// the command returns once that is done), bounded by `timeout`.
fn trigger_change(dev: &Path, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new("udevadm")
        .args(["trigger", "--action=change", "--settle"])
        .arg(dev)
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
