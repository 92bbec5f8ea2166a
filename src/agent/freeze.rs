//! FIFREEZE / FITHAW of the filesystems mounted on a block device.
//!
//! Freezing before the key is wiped makes the filesystem write back everything it has
//! acknowledged, so a revocation loses nothing that `fsync` returned for. Mounts are found by
//! the device's major:minor in /proc/self/mountinfo (bind mounts and namespaces included);
//! one mountpoint per superblock is enough, a second FIFREEZE would only return EBUSY.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from <linux/fs.h>.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Frozen filesystems, each held through a private *detached* copy of its mount
/// (`open_tree(OPEN_TREE_CLONE)`), so it can be thawed even after it was unmounted (a hook's
/// `umount -l`, or a shutdown unmounting a suspended volume) — and without pinning the mount
/// itself: an open directory of the real mountpoint made every `umount` of a suspended volume
/// fail with EBUSY (seen in the system test at shutdown), a detached copy does not.
#[derive(Debug, Default)]
pub struct FrozenSet {
    pub mounts: Vec<(PathBuf, File)>,
}

/// A descriptor on the filesystem mounted at `mp` that does not keep `mp` busy: the root of a
/// detached clone of that mount. Falls back to opening `mp` itself where open_tree(2) is
/// missing (Linux < 5.2) or refused.
fn open_unpinned(mp: &Path) -> io::Result<File> {
    use rustix::fs::{CWD, Mode, OFlags};
    use rustix::mount::{OpenTreeFlags, open_tree};
    let clone = open_tree(
        CWD,
        mp,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    );
    match clone {
        Ok(tree) => {
            // open_tree gives an O_PATH descriptor; the ioctls need a real one.
            let dir = rustix::fs::openat(
                &tree,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            Ok(File::from(dir))
        }
        Err(e) => {
            tracing::debug!(mountpoint = %mp.display(), error = %e, "open_tree of {} failed ({e}); freezing through the mountpoint itself (it stays busy while frozen)", mp.display());
            File::open(mp)
        }
    }
}

/// `major:minor` of a block device node.
pub fn dev_numbers(block_device: &Path) -> io::Result<(u32, u32)> {
    let rdev = std::fs::metadata(block_device)?.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}

/// Every mountpoint of `major:minor` in a mountinfo text, in mount order (`freeze` stops at
/// the first one it can freeze: they are all the same superblock).
pub fn mountpoints_in(mountinfo: &str, major: u32, minor: u32) -> Vec<PathBuf> {
    let want = format!("{major}:{minor}");
    kvcrypt_host::mountinfo::parse(mountinfo)
        .into_iter()
        .filter(|m| m.devno == want)
        .map(|m| m.mount_point)
        .collect()
}

fn mountpoints(block_device: &Path) -> io::Result<Vec<PathBuf>> {
    let (ma, mi) = dev_numbers(block_device)?;
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mountpoints_in(&text, ma, mi))
}

fn ioctl(f: &File, req: libc::c_ulong) -> io::Result<()> {
    // SAFETY: FIFREEZE/FITHAW take no argument memory (the int argument is ignored by the
    // kernel); the fd is valid for the duration of the call because `f` is borrowed.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), req as _, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Freezes every filesystem mounted on `block_device`. Errors are logged, not fatal: the key
/// must be wiped whether or not the freeze worked.
pub fn freeze(block_device: &Path) -> FrozenSet {
    let mut set = FrozenSet::default();
    let mps = match mountpoints(block_device) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(device = %block_device.display(), error = %e, "cannot list the mounts of {} to freeze: {e}", block_device.display());
            return set;
        }
    };
    for mp in mps {
        let f = match open_unpinned(&mp) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(mountpoint = %mp.display(), error = %e, "cannot open {} to freeze it: {e}", mp.display());
                continue;
            }
        };
        match ioctl(&f, FIFREEZE) {
            Ok(()) => {
                tracing::info!(mountpoint = %mp.display(), device = %block_device.display(), "filesystem {} on {} frozen", mp.display(), block_device.display());
                set.mounts.push((mp, f));
                // One superblock per device: the other mountpoints are the same filesystem.
                break;
            }
            // EBUSY: already frozen (e.g. by an operator); EOPNOTSUPP: fs cannot freeze.
            Err(e) => {
                tracing::warn!(mountpoint = %mp.display(), error = %e, "FIFREEZE of {} failed: {e}", mp.display())
            }
        }
    }
    set
}

/// Thaws what `freeze` froze; with `None`, thaws whatever is mounted on the device (after an
/// agent restart). EINVAL (not frozen) is expected there and ignored.
pub fn thaw(block_device: &Path, frozen: Option<FrozenSet>) {
    let files: Vec<(PathBuf, File)> = match frozen {
        Some(s) => s.mounts,
        None => mountpoints(block_device)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|mp| File::open(&mp).ok().map(|f| (mp, f)))
            .collect(),
    };
    for (mp, f) in files {
        match ioctl(&f, FITHAW) {
            Ok(()) => {
                tracing::info!(mountpoint = %mp.display(), "filesystem {} thawed", mp.display())
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => {
                tracing::warn!(mountpoint = %mp.display(), error = %e, "FITHAW of {} failed: {e}", mp.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mounts_by_dev_numbers_with_escapes() {
        let mi = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
90 22 7:3 / /mnt/with\\040space rw,relatime shared:40 - ext4 /dev/loop3 rw
91 22 7:3 /sub /srv/bind rw,relatime shared:40 - ext4 /dev/loop3 rw
92 22 7:30 / /mnt/other rw - ext4 /dev/loop30 rw
";
        assert_eq!(
            mountpoints_in(mi, 7, 3),
            vec![PathBuf::from("/mnt/with space"), PathBuf::from("/srv/bind")]
        );
        assert!(mountpoints_in(mi, 8, 0).is_empty());
    }
}
