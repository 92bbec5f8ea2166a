//! `/proc/self/mountinfo` and private mount namespaces, shared by everything that needs to
//! know what is mounted where: the agent (FIFREEZE the filesystems on a device) and the
//! workers of both transports (a private namespace, cleared of mounts that would pin devices:
//! [`enter_worker_namespace`]).

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo: `id parent major:minor root mountpoint options ... - fstype source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted device, as the kernel writes it.
    pub devno: String,
    /// Root of the mount within its filesystem (differs from `/` for bind mounts).
    pub root: String,
    /// Mount point, unescaped.
    pub mount_point: PathBuf,
    /// Filesystem type (after the ` - ` separator; empty if the line has none).
    pub fstype: String,
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
            // Optional fields (shared:N, master:N …) end at a lone "-".
            let fstype = f.skip_while(|x| *x != "-").nth(1).unwrap_or_default();
            Some(MountEntry {
                devno: devno.to_string(),
                root: unescape(root),
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: unescape(fstype),
            })
        })
        .collect()
}

/// The calling process's mounts (its mount namespace).
pub fn read_own() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// Why the calling thread could not get a private mount namespace. The two EPERM cases need
/// different fixes, so they are told apart: a seccomp filter (systemd's `RestrictNamespaces=`)
/// refuses unshare(2) with EPERM even to a process that has CAP_SYS_ADMIN, and blaming the
/// capability then sends the operator the wrong way.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error(
        "mount namespaces are forbidden for this process (a seccomp filter, e.g. systemd \
         RestrictNamespaces= without \"mnt\"): unshare(CLONE_NEWNS): {0}"
    )]
    Forbidden(io::Error),
    #[error(
        "a private mount namespace needs CAP_SYS_ADMIN (run as root): unshare(CLONE_NEWNS): {0}"
    )]
    NoCapability(io::Error),
    #[error(
        "unshare(CLONE_NEWNS) is not permitted (needs CAP_SYS_ADMIN, and no seccomp filter \
         such as systemd RestrictNamespaces= forbidding mount namespaces): {0}"
    )]
    NotPermitted(io::Error),
    #[error("unshare(CLONE_NEWNS) failed: {0}")]
    Unshare(io::Error),
    #[error("making the mounts of the new namespace private failed: {0}")]
    Propagation(io::Error),
    #[error("reading the mount table of the new namespace: {0}")]
    MountTable(io::Error),
}

impl NamespaceError {
    /// Refused by policy (capability or seccomp) rather than a failure of the system.
    pub fn is_permission(&self) -> bool {
        matches!(
            self,
            Self::Forbidden(_) | Self::NoCapability(_) | Self::NotPermitted(_)
        )
    }
}

/// Capability number of CAP_SYS_ADMIN (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;

/// Names the cause of a failed unshare(CLONE_NEWNS) from its error and the effective
/// capability set (`CapEff`, `None` if unknown): EPERM with CAP_SYS_ADMIN can only come from a
/// seccomp filter (or an LSM); EPERM without it is the missing capability.
pub fn classify_unshare_error(cap_eff: Option<u64>, err: io::Error) -> NamespaceError {
    if err.raw_os_error() != Some(libc::EPERM) {
        return NamespaceError::Unshare(err);
    }
    match cap_eff {
        Some(caps) if caps & (1 << CAP_SYS_ADMIN) != 0 => NamespaceError::Forbidden(err),
        Some(_) => NamespaceError::NoCapability(err),
        None => NamespaceError::NotPermitted(err),
    }
}

/// The `CapEff:` mask of a `/proc/…/status` text.
pub fn cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Moves the calling thread (and the threads it spawns afterwards) into a new mount namespace
/// whose mounts are all private: mounts made here stay invisible to every other process, and the
/// host's later mounts stay out of ours. The new namespace starts as a copy of the old one —
/// workers use [`enter_worker_namespace`], which also drops copies that would pin other
/// devices' filesystems.
pub fn unshare_private_namespace() -> Result<(), NamespaceError> {
    // SAFETY: unshare takes only flags; CLONE_NEWNS (with the implied CLONE_FS) affects only the
    // calling thread's namespace, which is allowed in a multi-threaded process.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        let err = io::Error::last_os_error();
        // Capabilities are per thread: this thread's set is the one unshare checked.
        let caps = std::fs::read_to_string("/proc/thread-self/status")
            .ok()
            .and_then(|s| cap_eff(&s));
        return Err(classify_unshare_error(caps, err));
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
        return Err(NamespaceError::Propagation(io::Error::last_os_error()));
    }
    Ok(())
}

/// Moves the calling thread (and the threads it spawns afterwards) into a private mount
/// namespace and detaches there every mount the worker does not need (see [`worker_keeps`];
/// `run_dir`: the worker's run directory, whose mount stays). Both transports' workers start
/// serving this way.
///
/// Why: a new namespace starts as a copy of every mount, and a copy pins its filesystem for as
/// long as we run: the user's `umount /srv/data` succeeds in their namespace, but the device
/// under it stays busy, so `kvcrypt close` of that volume fails "in use" (seen in the VM: a
/// ublk worker held a FUSE volume's ext4), and a ublk server holding a mount of its *own* device
/// deadlocks its deletion (the known libublk deadlock: `close` after a recovery hung). Private propagation keeps the host's later mounts out of our copy.
/// Open descriptors (the backing store, already opened) are unaffected by detaching.
pub fn enter_worker_namespace(run_dir: Option<&Path>) -> Result<(), NamespaceError> {
    unshare_private_namespace()?;
    let mounts = read_own().map_err(NamespaceError::MountTable)?;
    let run_dir = run_dir.map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.to_owned()));
    let run_mount = run_dir.and_then(|d| mount_holding(&mounts, &d).map(Path::to_path_buf));
    detach(&mounts, |m| !worker_keeps(m, run_mount.as_deref()));
    Ok(())
}

/// Whether a worker's private namespace keeps mount `m`; `run_mount` is the mount point of the
/// run directory (state file, control socket, FUSE file). Kept:
///
/// - `/dev`, `/proc`, `/sys` and everything below them: kernel filesystems that pin no disk,
///   and the worker needs them (device nodes for fuse/loop/ublk and `/dev/disk/by-kvcrypt`,
///   `/proc/self`, `/sys/dev/block`, fusectl's `abort`). systemd's ProtectKernelTunables /
///   ProtectKernelLogs / ProtectControlGroups bind mounts there stay as they are.
/// - `/run` itself (tmpfs; libublk keeps its device files in `/run/ublksrvd`), but not what is
///   mounted below it: `/run/credentials/UNIT` (LoadCredential: the vault secret is no business
///   of a worker), `/run/user/N`, removable media under `/run/media`.
/// - the run directory's mount (ReadWritePaths=/run/kvcrypt is a bind mount of its own) and
///   every mount above it (`/` included): detaching a parent would take it along.
///
/// Everything else goes, including what systemd's sandbox adds: ProtectSystem's read-only
/// binds of /usr, /boot, /efi, /etc, ProtectHome's of /home and /root, PrivateTmp's /tmp and
/// /var/tmp. The worker needs none of it after exec: its binary and shared libraries are
/// already mapped (the mappings keep their own references), it reads no configuration, and its
/// log is an inherited descriptor. It starts no programs, except `kvcrypt open --foreground`
/// (serving in the calling process), which runs `udevadm` to name its device and falls back to
/// making the link itself if that cannot run.
pub fn worker_keeps(m: &MountEntry, run_mount: Option<&Path>) -> bool {
    let p = m.mount_point.as_path();
    let kernel = ["/dev", "/proc", "/sys"].iter().any(|k| p.starts_with(k));
    kernel
        || p == Path::new("/")
        || p == Path::new("/run")
        || run_mount.is_some_and(|r| r.starts_with(p))
}

/// The mount point of the mount that holds `path` (the longest mount point it lies under).
pub fn mount_holding<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a Path> {
    mounts
        .iter()
        .map(|m| m.mount_point.as_path())
        .filter(|mp| path.starts_with(mp))
        .max_by_key(|mp| mp.as_os_str().len())
}

/// Lazily unmounts (`MNT_DETACH`), in the caller's mount namespace only, every mount of
/// `mounts` for which `pick` is true — children before parents. Failures are logged: a mount
/// that stays only keeps its filesystem busy, it does not endanger data.
fn detach(mounts: &[MountEntry], pick: impl Fn(&MountEntry) -> bool) {
    // Children follow their parents in mountinfo: unmount in reverse order.
    for m in mounts.iter().rev().filter(|m| pick(m)) {
        let Ok(c) = std::ffi::CString::new(m.mount_point.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: `c` is a valid NUL-terminated path; MNT_DETACH only affects our namespace.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            // EINVAL: no longer a mount point (went with a parent detached before it).
            if e.raw_os_error() != Some(libc::EINVAL) {
                tracing::warn!(mount = %m.mount_point.display(), error = %e,
                    "cannot detach {} from the private mount namespace: {e}", m.mount_point.display());
            }
        }
    }
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
    fn unshare_errors_name_the_cause() {
        let eperm = || io::Error::from_raw_os_error(libc::EPERM);
        let root = cap_eff("Name:\tkvcrypt\nCapEff:\t000001ffffffffff\n");
        assert_eq!(root, Some(0x1ff_ffff_ffff));
        // As systemd's RestrictNamespaces=yes leaves it: root with every capability, EPERM.
        let e = classify_unshare_error(root, eperm());
        assert!(matches!(e, NamespaceError::Forbidden(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("forbidden") && msg.contains("RestrictNamespaces"),
            "{msg}"
        );
        assert!(!msg.contains("needs CAP_SYS_ADMIN"), "{msg}");
        // Everything but CAP_SYS_ADMIN (bit 21).
        let no_admin = Some(0x1ff_ffff_ffff & !(1u64 << 21));
        let e = classify_unshare_error(no_admin, eperm());
        assert!(
            e.to_string().contains("needs CAP_SYS_ADMIN (run as root)"),
            "{e}"
        );
        assert!(!e.to_string().contains("seccomp"), "{e}");
        // Capabilities unknown: both causes are named.
        let e = classify_unshare_error(None, eperm());
        assert!(e.to_string().contains("CAP_SYS_ADMIN") && e.to_string().contains("seccomp"));
        // Not EPERM (e.g. user.max_mnt_namespaces reached): no guess about the cause.
        let e = classify_unshare_error(root, io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(e, NamespaceError::Unshare(_)), "{e:?}");
        assert!(!e.is_permission());
        assert_eq!(cap_eff("Name:\tx\n"), None);
    }

    /// The body of the child processes below (a no-op in a normal test run): unshares and prints
    /// what came of it for the parent to check.
    #[test]
    fn unshare_in_child() {
        if std::env::var_os(CHILD_MARK).is_none() {
            return;
        }
        match unshare_private_namespace() {
            Ok(()) => println!("UNSHARE-RESULT: ok"),
            Err(e) => println!("UNSHARE-RESULT: {e}"),
        }
    }

    const CHILD_MARK: &str = "KVCRYPT_TEST_UNSHARE_CHILD";

    /// Runs [`unshare_in_child`] in a new process of this test binary, set up by `setup`
    /// (`cmd` runs `prefix` + the test binary), and returns its result line.
    fn unshare_result_in_child(
        prefix: &[&str],
        setup: impl FnOnce(&mut std::process::Command),
    ) -> String {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = std::process::Command::new(p);
                c.args(rest).arg(&exe);
                c
            }
            None => std::process::Command::new(&exe),
        };
        cmd.args([
            "--exact",
            "mountinfo::tests::unshare_in_child",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env(CHILD_MARK, "1");
        setup(&mut cmd);
        let out = cmd.output().expect("starting the child test process");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // libtest prints the test's name on the same line first.
        text.lines()
            .find_map(|l| l.split_once("UNSHARE-RESULT: ").map(|(_, r)| r))
            .unwrap_or_else(|| {
                panic!(
                    "no result from the child ({}): {text}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .to_owned()
    }

    /// Whether this process has CAP_SYS_ADMIN (the tests below need root to start from).
    fn have_cap_sys_admin() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        cap_eff(&status).is_some_and(|c| c & (1 << CAP_SYS_ADMIN) != 0)
    }

    /// For real: a child without CAP_SYS_ADMIN (dropped from its bounding and inheritable sets
    /// by setpriv, so root's exec does not get it back) is told it needs the capability.
    #[test]
    fn unshare_without_cap_sys_admin_names_the_capability() {
        if !have_cap_sys_admin() || !std::path::Path::new("/usr/bin/setpriv").exists() {
            eprintln!("SKIPPING: needs root (CAP_SYS_ADMIN) and setpriv");
            return;
        }
        let r = unshare_result_in_child(
            &[
                "/usr/bin/setpriv",
                "--inh-caps=-sys_admin",
                "--bounding-set=-sys_admin",
                "--",
            ],
            |_| {},
        );
        assert!(r.contains("needs CAP_SYS_ADMIN"), "{r}");
        assert!(!r.contains("seccomp"), "{r}");
    }

    /// For real: a child that keeps CAP_SYS_ADMIN but runs under a seccomp filter refusing
    /// unshare(2) with EPERM — what systemd's RestrictNamespaces=yes installs — is told that
    /// namespaces are forbidden, not that it lacks the capability.
    #[test]
    fn unshare_forbidden_by_seccomp_says_so_not_the_capability() {
        use std::os::unix::process::CommandExt;
        if !have_cap_sys_admin() {
            eprintln!("SKIPPING: needs root (CAP_SYS_ADMIN)");
            return;
        }
        let stmt = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let jump = |k: u32, jt: u8, jf: u8| libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt,
            jf,
            k,
        };
        // Load the syscall number (offset 0 of seccomp_data); unshare → EPERM, else allow.
        let mut filter = vec![
            stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
            jump(libc::SYS_unshare as u32, 0, 1),
            stmt(
                libc::BPF_RET | libc::BPF_K,
                libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            ),
            stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        ];
        let r = unshare_result_in_child(&[], move |cmd| {
            // SAFETY: between fork and exec the closure only calls prctl(2) (async-signal-safe)
            // with a program built before the fork; NO_NEW_PRIVS lets an installed filter
            // survive exec without CAP_SYS_ADMIN checks and does not drop root's capabilities.
            unsafe {
                cmd.pre_exec(move || {
                    let prog = libc::sock_fprog {
                        len: filter.len() as u16,
                        filter: filter.as_mut_ptr(),
                    };
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                        || libc::prctl(
                            libc::PR_SET_SECCOMP,
                            libc::SECCOMP_MODE_FILTER,
                            &prog as *const libc::sock_fprog,
                        ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        });
        assert!(r.contains("forbidden"), "{r}");
        assert!(r.contains("RestrictNamespaces"), "{r}");
        assert!(!r.contains("needs CAP_SYS_ADMIN"), "{r}");
    }

    /// What a worker started from kvcrypt-agent.service sees when it unshares: systemd's
    /// sandbox (ProtectSystem=strict, ProtectHome=read-only, PrivateTmp, ReadWritePaths=
    /// /run/kvcrypt, LoadCredential, ProtectKernelTunables/Logs, ProtectControlGroups,
    /// ProtectProc=invisible) over a host with separate /boot, /boot/efi and /home, another
    /// kvcrypt volume's ext4 (FUSE: a loop device), a ublk volume's xfs, NFS and a USB stick.
    const SERVICE_MOUNTINFO: &str = "\
24 1 254:1 / / ro,relatime master:1 - ext4 /dev/vda1 rw,errors=remount-ro
25 24 0:5 / /dev rw,nosuid,relatime master:2 - devtmpfs udev rw,size=1989084k,mode=755
26 25 0:23 / /dev/pts rw,nosuid,noexec,relatime master:3 - devpts devpts rw,gid=5,mode=620
27 25 0:25 / /dev/shm rw,nosuid,nodev master:4 - tmpfs tmpfs rw,inode64
28 25 0:20 / /dev/mqueue rw,nosuid,nodev,noexec,relatime master:14 - mqueue mqueue rw
29 25 0:26 /systemd/inaccessible/chr /dev/kmsg ro,nosuid,nodev,noexec,relatime master:12 - tmpfs tmpfs rw,size=401264k,mode=755
30 24 0:22 / /sys ro,nosuid,nodev,noexec,relatime master:6 - sysfs sysfs rw
31 30 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime master:7 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:35 / /sys/fs/fuse/connections ro,nosuid,nodev,noexec,relatime master:15 - fusectl fusectl rw
33 24 0:21 / /proc rw,nosuid,nodev,noexec,relatime master:11 - proc proc rw,hidepid=invisible
34 33 0:21 /sys /proc/sys ro,nosuid,nodev,noexec,relatime master:11 - proc proc rw
35 33 0:21 /sysrq-trigger /proc/sysrq-trigger ro,nosuid,nodev,noexec,relatime master:11 - proc proc rw
36 24 0:26 / /run ro,nosuid,nodev,noexec,relatime master:12 - tmpfs tmpfs rw,size=401264k,mode=755
37 36 0:26 /kvcrypt /run/kvcrypt rw,nosuid,nodev,noexec,relatime master:12 - tmpfs tmpfs rw,size=401264k,mode=755
38 36 0:40 / /run/credentials/kvcrypt-agent.service ro,nosuid,nodev,noexec,relatime - ramfs ramfs rw,mode=700
39 36 0:45 / /run/user/0 ro,nosuid,nodev,relatime master:200 - tmpfs tmpfs rw,size=401260k,mode=700
40 36 8:17 / /run/media/root/USB ro,nosuid,nodev,relatime master:210 - vfat /dev/sdb1 rw
41 24 254:1 /usr /usr ro,relatime master:1 - ext4 /dev/vda1 rw,errors=remount-ro
42 24 254:1 /etc /etc ro,relatime master:1 - ext4 /dev/vda1 rw,errors=remount-ro
43 24 254:2 / /boot ro,relatime master:20 - ext4 /dev/vda2 rw
44 43 254:3 / /boot/efi ro,relatime master:21 - vfat /dev/vda3 rw,fmask=0077
45 24 254:1 /tmp/systemd-private-3f2a-kvcrypt-agent.service-Xb1s/tmp /tmp rw,nosuid,nodev,relatime master:1 - ext4 /dev/vda1 rw
46 24 254:1 /var/tmp/systemd-private-3f2a-kvcrypt-agent.service-Q0pz/tmp /var/tmp rw,nosuid,nodev,relatime master:1 - ext4 /dev/vda1 rw
47 24 254:4 / /home ro,relatime master:22 - ext4 /dev/vda4 rw
48 24 254:1 /root /root ro,relatime master:1 - ext4 /dev/vda1 rw
49 24 7:0 / /srv/data ro,relatime master:30 - ext4 /dev/loop0 rw
50 24 259:1 / /srv/ublk ro,relatime master:31 - xfs /dev/ublkb1 rw
51 24 0:50 / /mnt/nfs ro,relatime master:40 - nfs4 server:/export rw,vers=4.2
";

    #[test]
    fn worker_namespace_keeps_only_what_a_worker_needs() {
        let mounts = parse(SERVICE_MOUNTINFO);
        assert_eq!(mounts.len(), 28);
        assert_eq!(mounts[1].fstype, "devtmpfs");
        let run_mount = mount_holding(&mounts, Path::new("/run/kvcrypt"));
        assert_eq!(run_mount, Some(Path::new("/run/kvcrypt")));
        let kept: Vec<&str> = mounts
            .iter()
            .filter(|m| worker_keeps(m, run_mount))
            .map(|m| m.mount_point.to_str().unwrap())
            .collect();
        assert_eq!(
            kept,
            [
                "/",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/dev/kmsg",
                "/sys",
                "/sys/fs/cgroup",
                "/sys/fs/fuse/connections",
                "/proc",
                "/proc/sys",
                "/proc/sysrq-trigger",
                "/run",
                "/run/kvcrypt",
            ]
        );
        // Named, because these are what the bug and the sandbox are about.
        for gone in [
            "/srv/data",
            "/srv/ublk",
            "/run/credentials/kvcrypt-agent.service",
            "/usr",
            "/etc",
            "/tmp",
            "/boot/efi",
        ] {
            assert!(!kept.contains(&gone), "{gone} must be detached");
        }
    }

    #[test]
    fn worker_namespace_keeps_a_run_directory_elsewhere_and_its_parents() {
        // KVCRYPT_RUN_DIR on a separate /var whose /var/tmp is PrivateTmp's bind mount.
        let text = "\
24 1 254:1 / / rw - ext4 /dev/vda1 rw
30 24 254:5 / /var rw - ext4 /dev/vda5 rw
31 30 254:5 /tmp/systemd-private-x/tmp /var/tmp rw - ext4 /dev/vda5 rw
32 30 7:1 / /var/lib/data rw - ext4 /dev/loop1 rw
";
        let mounts = parse(text);
        let run_mount = mount_holding(&mounts, Path::new("/var/tmp/kvcrypt-test/run"));
        assert_eq!(run_mount, Some(Path::new("/var/tmp")));
        let kept: Vec<&str> = mounts
            .iter()
            .filter(|m| worker_keeps(m, run_mount))
            .map(|m| m.mount_point.to_str().unwrap())
            .collect();
        // /var must stay: detaching it would take /var/tmp along.
        assert_eq!(kept, ["/", "/var", "/var/tmp"]);
        // Without a run directory only the fixed set stays.
        assert!(!worker_keeps(&mounts[1], None));
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
