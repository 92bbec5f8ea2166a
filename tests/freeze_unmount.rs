//! FIFREEZE as the agent does it on revocation must not pin the mount: a suspended volume's
//! filesystem can still be unmounted (by an operator, or by systemd at shutdown — in the
//! system test an open mountpoint made that umount fail with EBUSY), and the agent can still
//! thaw it afterwards. Real ext4 on a loop device; needs root.

use std::path::{Path, PathBuf};
use std::process::Command;

use kvcrypt::agent::freeze;
use std::os::unix::fs::OpenOptionsExt;

fn root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

struct Loop(PathBuf);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// A fresh ext4 on a loop device, mounted on a temporary directory.
fn mounted_ext4() -> (tempfile::TempDir, Loop, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    let dev = Loop(PathBuf::from(run(Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&img))));
    let mp = d.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    run(Command::new("mount").arg(&dev.0).arg(&mp));
    (d, dev, mp)
}

fn mounted(mp: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap()))
}

#[test]
fn a_frozen_filesystem_can_be_unmounted_and_is_thawed_afterwards() {
    if !root() {
        eprintln!("not root: skipping (loop devices, mount)");
        return;
    }
    let (_d, dev, mp) = mounted_ext4();
    std::fs::write(mp.join("f"), b"acknowledged").unwrap();

    let set = freeze::freeze(&dev.0);
    assert_eq!(set.mounts.len(), 1, "frozen");
    // Frozen: a write from another process waits (we only check it has not finished).
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!("echo late > {}/g", mp.display()))
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        writer.try_wait().unwrap().is_none(),
        "write went through a frozen filesystem"
    );

    // Lazily unmounted (what a revocation hook does)...
    let um = Command::new("umount").arg("-l").arg(&mp).status().unwrap();
    assert!(um.success());
    assert!(!mounted(&mp));

    // ... and the agent can still thaw it: the writer finishes.
    freeze::thaw(&dev.0, Some(set));
    let st = writer.wait().unwrap();
    assert!(st.success(), "the held write failed after thaw: {st}");
}

#[test]
fn umount_of_a_frozen_filesystem_is_not_refused_as_busy() {
    if !root() {
        eprintln!("not root: skipping (loop devices, mount)");
        return;
    }
    let (_d, dev, mp) = mounted_ext4();

    let set = freeze::freeze(&dev.0);
    assert_eq!(set.mounts.len(), 1, "frozen");
    // What systemd does when it stops the mount unit: a plain umount.
    let um = Command::new("umount").arg(&mp).output().unwrap();
    // Thaw before judging, so a failure does not leave a frozen filesystem behind.
    freeze::thaw(&dev.0, Some(set));
    if !um.status.success() {
        let _ = Command::new("umount").arg(&mp).status();
    }
    assert!(
        um.status.success(),
        "umount of the frozen filesystem refused: {}",
        String::from_utf8_lossy(&um.stderr)
    );
    // Thawed and released: nothing holds the loop device any more.
    let busy = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&dev.0)
        .err();
    assert!(
        busy.is_none(),
        "the filesystem still holds {}: {busy:?}",
        dev.0.display()
    );
}
