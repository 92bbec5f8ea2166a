//! Parsing of `/proc/self/mountinfo`, shared by everything that needs to know what is mounted
//! where: the agent (FIFREEZE the filesystems on a device) and the transports (detach foreign
//! mounts from a worker's private mount namespace).

use std::io;
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
