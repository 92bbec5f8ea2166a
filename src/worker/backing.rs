//! Notices that the worker's backing block device went away (hot-unplug, QMP `device_del`, a
//! detached cloud disk). Without this the worker kept serving a device whose every request
//! failed, kept the dead disk's kernel name pinned (the re-added disk came back under another
//! name) and the agent still showed the volume as serving.
//!
//! Why polling sysfs rather than a udev monitor: the worker must notice it with or without udev
//! and an agent, and one `realpath` + one small read a second costs nothing. A disk is the same
//! disk while `/sys/dev/block/MAJ:MIN` resolves to the same device path and its `diskseq`
//! (Linux ≥ 5.15: a per-boot counter, new for every disk the kernel creates) is unchanged — so a
//! different disk that reuses the numbers within a poll interval is still noticed.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the backing device is looked at.
pub const POLL: Duration = Duration::from_secs(1);

/// What identifies the backing block device while it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingDisk {
    device: PathBuf,
    /// `SYS/dev/block/MAJ:MIN`.
    link: PathBuf,
    /// Where `link` resolved to when the worker started.
    resolved: PathBuf,
    diskseq: Option<String>,
}

impl BackingDisk {
    /// The identity of `device` if it is a block device (None for a regular file: files do not
    /// disappear from under an open descriptor). `sys` is normally `/sys`.
    pub fn identify(device: &Path, sys: &Path) -> Option<BackingDisk> {
        let md = std::fs::metadata(device).ok()?;
        if !md.file_type().is_block_device() {
            return None;
        }
        let rdev = md.rdev();
        let link =
            sys.join("dev/block")
                .join(format!("{}:{}", libc::major(rdev), libc::minor(rdev)));
        let resolved = std::fs::canonicalize(&link).ok()?;
        let diskseq = read_diskseq(&resolved);
        Some(BackingDisk {
            device: device.to_owned(),
            link,
            resolved,
            diskseq,
        })
    }

    /// Why the disk is no longer the one we serve from, or None while it is.
    pub fn gone(&self) -> Option<String> {
        let dev = self.device.display();
        match std::fs::canonicalize(&self.link) {
            Err(_) => Some(format!(
                "{dev} was removed ({} is gone)",
                self.link.display()
            )),
            Ok(now) if now != self.resolved => Some(format!(
                "{dev} was removed (its device number now belongs to {})",
                now.display()
            )),
            Ok(now) if read_diskseq(&now) != self.diskseq => Some(format!(
                "{dev} was removed and another disk took its place (diskseq changed)"
            )),
            Ok(_) => None,
        }
    }
}

/// `diskseq` of a disk, or of the disk a partition belongs to.
fn read_diskseq(sysdir: &Path) -> Option<String> {
    let own = std::fs::read_to_string(sysdir.join("diskseq"));
    let text = match own {
        Ok(t) => t,
        Err(_) => std::fs::read_to_string(sysdir.parent()?.join("diskseq")).ok()?,
    };
    Some(text.trim().to_owned())
}

/// Starts a thread that calls `on_gone` once (with the reason) when the disk disappears.
pub fn watch(disk: BackingDisk, on_gone: impl FnOnce(String) + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("kvcrypt-backing".into())
        .spawn(move || {
            loop {
                std::thread::sleep(POLL);
                if let Some(why) = disk.gone() {
                    on_gone(why);
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch the backing device for removal: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake /sys with the real block device's numbers pointing at a fake device directory.
    struct FakeSys {
        dir: tempfile::TempDir,
        link: PathBuf,
    }

    impl FakeSys {
        fn new(dev: &Path) -> FakeSys {
            let dir = tempfile::tempdir().unwrap();
            let rdev = std::fs::metadata(dev).unwrap().rdev();
            std::fs::create_dir_all(dir.path().join("dev/block")).unwrap();
            let link = dir.path().join(format!(
                "dev/block/{}:{}",
                libc::major(rdev),
                libc::minor(rdev)
            ));
            let s = FakeSys { dir, link };
            s.plug("disk-a", "7");
            s
        }
        fn plug(&self, name: &str, seq: &str) {
            let d = self.dir.path().join("devices").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("diskseq"), format!("{seq}\n")).unwrap();
            let _ = std::fs::remove_file(&self.link);
            symlink(&d, &self.link).unwrap();
        }
    }

    /// Any block device of the test machine: only its numbers are used.
    fn some_block_device() -> Option<PathBuf> {
        std::fs::read_dir("/dev")
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device()))
    }

    #[test]
    fn a_regular_file_is_never_watched() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(BackingDisk::identify(f.path(), Path::new("/sys")), None);
    }

    #[test]
    fn removal_replacement_and_a_new_disk_with_the_same_numbers_are_noticed() {
        let Some(dev) = some_block_device() else {
            eprintln!("no block device in /dev; skipping");
            return;
        };
        let sys = FakeSys::new(&dev);
        let disk = BackingDisk::identify(&dev, sys.dir.path()).expect("identified");
        assert_eq!(disk.gone(), None, "present");

        // Same numbers, same place, new disk (diskseq moved on).
        sys.plug("disk-a", "8");
        assert!(disk.gone().unwrap().contains("diskseq"));
        sys.plug("disk-a", "7");
        assert_eq!(disk.gone(), None);

        // The numbers now belong to another device.
        sys.plug("disk-b", "7");
        assert!(disk.gone().unwrap().contains("now belongs to"));

        // Unplugged.
        std::fs::remove_file(&sys.link).unwrap();
        let why = disk.gone().unwrap();
        assert!(
            why.contains("was removed") && why.contains(&dev.display().to_string()),
            "{why}"
        );
    }

    #[test]
    fn the_real_backing_device_is_present() {
        let Some(dev) = some_block_device() else {
            return;
        };
        let disk = BackingDisk::identify(&dev, Path::new("/sys")).expect("real sysfs entry");
        assert_eq!(disk.gone(), None);
    }
}
