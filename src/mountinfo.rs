//! `/proc/self/mountinfo` and private mount namespaces, shared by everything that needs to
//! know what is mounted where: the agent (FIFREEZE the filesystems on a device) and the
//! workers of both transports (a private namespace, cleared of mounts that would pin devices).

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// One line of mountinfo: `id parent major:minor root mountpoint options ... - fstype source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted device, as the kernel writes it.
    pub devno: String,
    /// Root of the mount within its filesystem (differs from `/` for bind mounts).
    pub root: String,
    /// Mount point, unescaped.
    pub mount_point: PathBuf,
}

/// Entries of a mountinfo text, in the kernel's order (parents before their children).
/// Malformed lines are skipped: the text comes from the kernel, never from a user.
pub fn parse(mountinfo: &str) -> Vec<MountEntry> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let (_id, _parent) = (f.next()?, f.next()?);
            let (devno, root, mount_point) = (f.next()?, f.next()?, f.next()?);
            Some(MountEntry {
                devno: devno.to_string(),
                root: unescape(root),
                mount_point: PathBuf::from(unescape(mount_point)),
            })
        })
        .collect()
}

/// The calling process's mounts (its mount namespace).
pub fn read_own() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// Moves the calling thread (and the threads it spawns afterwards) into a new mount namespace
/// whose mounts are all private: mounts made here stay invisible to every other process, and the
/// host's later mounts stay out of ours. The new namespace starts as a copy of the old one —
/// use [`detach_mounts`] to drop copies that would pin other devices' filesystems.
pub fn unshare_private_namespace() -> io::Result<()> {
    // SAFETY: unshare takes only flags; CLONE_NEWNS (with the implied CLONE_FS) affects only the
    // calling thread's namespace, which is allowed in a multi-threaded process.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: every pointer is a NUL-terminated static string or null; with MS_REC | MS_PRIVATE
    // mount(2) only changes the propagation of our (now private) mount tree.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lazily unmounts (`MNT_DETACH`), in the caller's mount namespace only, every mount for which
/// `detach` is true — children before parents. Failures are logged: a mount that stays only
/// keeps its filesystem busy, it does not endanger data.
pub fn detach_mounts(detach: impl Fn(&MountEntry) -> bool) -> io::Result<()> {
    let mounts = read_own()?;
    // Children follow their parents in mountinfo: unmount in reverse order.
    for m in mounts.iter().rev().filter(|m| detach(m)) {
        let Ok(c) = std::ffi::CString::new(m.mount_point.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: `c` is a valid NUL-terminated path; MNT_DETACH only affects our namespace.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            tracing::warn!(mount = %m.mount_point.display(), error = %e, "cannot detach mount from the private namespace");
        }
    }
    Ok(())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                // Three octal digits can exceed a byte (\777); wrap like the kernel never emits.
                let v = (d[0] - b'0') as u16 * 64 + (d[1] - b'0') as u16 * 8 + (d[2] - b'0') as u16;
                out.push(v as u8);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 22 259:3 / /srv/my\\040data rw,relatime shared:5 - ext4 /dev/ublkb0 rw
36 22 259:3 /sub /mnt/bind\\134x rw - ext4 /dev/ublkb0 rw
garbage
";

    #[test]
    fn parses_devno_root_and_unescaped_mount_points() {
        let e = parse(SAMPLE);
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].devno, "8:1");
        assert_eq!(e[1].mount_point, PathBuf::from("/srv/my data"));
        assert_eq!(e[2].root, "/sub");
        assert_eq!(e[2].mount_point, PathBuf::from("/mnt/bind\\x"));
    }

    #[test]
    fn reads_own_mounts() {
        let own = read_own().expect("mountinfo");
        assert!(
            own.iter()
                .any(|m| m.mount_point == std::path::Path::new("/"))
        );
    }
}
