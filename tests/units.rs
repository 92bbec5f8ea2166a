//! systemd units and udev rules pass the checks the machine's tools offer:
//! `systemd-analyze verify` / `security`, and `udevadm verify` where it exists (systemd ≥ 253)
//! or else `udevadm test` on a real loop device with the rules bind-mounted in a private mount
//! namespace (udev 252 on Debian 12 has no `verify`).

use std::path::{Path, PathBuf};
use std::process::Command;

use kvcrypt_testkit::env::have;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Units with the binary path pointing at the test build, under `dir/etc/systemd/system`.
fn staged_units(dir: &Path) -> PathBuf {
    let units = dir.join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    for u in [
        "kvcrypt-agent.service",
        "kvcrypt-attach@.service",
        "kvcrypt.target",
    ] {
        let text = std::fs::read_to_string(root().join("systemd").join(u)).unwrap();
        let text = text.replace("/usr/sbin/kvcrypt", env!("CARGO_BIN_EXE_kvcrypt"));
        std::fs::write(units.join(u), text).unwrap();
    }
    units
}

#[test]
fn systemd_units_verify_and_are_sandboxed() {
    if !have("systemd-analyze") {
        eprintln!("systemd-analyze not installed; skipping (scripts/setup.sh installs systemd)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let units = staged_units(d.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(units.join("kvcrypt-agent.service"))
        .arg(units.join("kvcrypt-attach@sdb.service"))
        .arg(units.join("kvcrypt.target"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Instances are verified through their template file.
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| {
            l.contains("kvcrypt") && !l.contains("kvcrypt-attach@sdb.service: No such file")
        })
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{err}");

    // Both units that run kvcrypt as root (the attach unit can start workers just like the
    // agent, so it gets the same sandbox).
    for unit in ["kvcrypt-agent.service", "kvcrypt-attach@sdb.service"] {
        let sec = Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(format!("--root={}", d.path().display()))
            .arg(unit)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&sec.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split(&format!("{unit}: ")).nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no exposure level in:\n{text}\n{}",
                    String::from_utf8_lossy(&sec.stderr)
                )
            });
        eprintln!("systemd-analyze security {unit}: {score}");
        // 3.x is systemd's "OK" band; a root daemon that must mount and manage block devices
        // cannot reach "SAFE". This guards against the sandbox being loosened by accident.
        assert!(
            score < 4.0,
            "{unit}: exposure level {score} regressed:\n{text}"
        );
    }
}

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Runs `udevadm test --action=add` on a fresh loop device with our rules (kvcrypt replaced by
/// `fake`) in /etc/udev/rules.d of a private mount namespace; returns the output.
fn udev_test_with(fake: &str) -> Option<(String, String)> {
    let d = tempfile::tempdir().unwrap();
    let rules = d.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let prog = d.path().join("fake-kvcrypt");
    std::fs::write(&prog, format!("#!/bin/sh\n{fake}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = std::fs::read_to_string(root().join("udev/60-kvcrypt.rules")).unwrap();
    std::fs::write(
        rules.join("60-kvcrypt.rules"),
        text.replace("/usr/sbin/kvcrypt", &prog.display().to_string()),
    )
    .unwrap();
    let img = d.path().join("img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let o = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&img)
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    let dev = Loop(String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let kname = dev.0.trim_start_matches("/dev/").to_owned();
    let out = Command::new("unshare")
        .arg("-m")
        .arg("sh")
        .arg("-c")
        .arg(format!(
            // udevadm test (252) really creates links, db files and node permissions: give it
            // a private /dev and /run (tmpfs in this namespace) with just the nodes it needs,
            // so the host's /dev and udev database stay untouched.
            "set -e; mount --make-rprivate /; mount --bind {rules} /etc/udev/rules.d; \
             mount -t tmpfs none /run; mount -t tmpfs none /dev; \
             mknod /dev/null c 1 3; mknod /dev/{kname} b $(tr ':' ' ' < /sys/class/block/{kname}/dev); \
             udevadm test --action=add /sys/class/block/{kname}",
            rules = rules.display()
        ))
        .output()
        .ok()?;
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((kname, all))
}

#[test]
fn udev_rules_check() {
    if !have("udevadm") {
        eprintln!("udevadm not installed; skipping");
        return;
    }
    let verify = Command::new("udevadm").args(["verify", "--help"]).output();
    if verify.is_ok_and(|o| o.status.success()) {
        let out = Command::new("udevadm")
            .arg("verify")
            .arg(root().join("udev/60-kvcrypt.rules"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "udevadm verify: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // SAFETY-free root check: only root can make loop devices and mount namespaces.
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" || !have("unshare") || !have("losetup") {
        eprintln!("not root / no unshare / no losetup: udevadm test part skipped");
        return;
    }

    // An encrypted kvcrypt device: probed, tagged, attach unit wanted, by-uuid link.
    let (k, out) = udev_test_with(
        "case \"$1\" in probe) echo ID_FS_TYPE=kvcrypt; echo ID_FS_UUID=2f6d1c8e-4b0a-4c59-9d8e-0a4b7f3c2e11; echo ID_FS_LABEL=data; exit 0;; *) exit 1;; esac",
    )
    .expect("loop device");
    assert!(
        out.contains("Reading rules file: /etc/udev/rules.d/60-kvcrypt.rules"),
        "{out}"
    );
    assert!(
        !out.to_lowercase().contains("invalid"),
        "rule errors:\n{out}"
    );
    assert!(
        out.contains(&format!("SYSTEMD_WANTS=kvcrypt-attach@{k}.service")),
        "{out}"
    );
    assert!(out.contains("ID_FS_USAGE=crypto"), "{out}");
    assert!(
        out.contains("/dev/disk/by-uuid/2f6d1c8e-4b0a-4c59-9d8e-0a4b7f3c2e11"),
        "{out}"
    );

    // A served plaintext device: named /dev/disk/by-kvcrypt/NAME, never probed.
    let (_k, out) = udev_test_with(
        "case \"$1\" in udev-name) echo data; exit 0;; probe) echo PROBED >&2; exit 1;; esac",
    )
    .expect("loop device");
    assert!(out.contains("/dev/disk/by-kvcrypt/data"), "{out}");
    assert!(out.contains("KVCRYPT_NAME=data"), "{out}");
    assert!(
        !out.contains("probe /dev/"),
        "a served device must not be probed:\n{out}"
    );

    // Anything else: probed, nothing added.
    let (_k, out) = udev_test_with("exit 1").expect("loop device");
    assert!(!out.contains("SYSTEMD_WANTS=kvcrypt"), "{out}");
    assert!(!out.contains("by-kvcrypt"), "{out}");
}

/// The one fstab recommendation: the README's line, found verbatim in docs/AGENT.md,
/// examples/fstab and the unit comments (tests/system boots with the README's line).
fn recommended_fstab_line() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    readme
        .lines()
        .find(|l| l.starts_with("/dev/disk/by-kvcrypt/data "))
        .expect("README.md documents an fstab line for /dev/disk/by-kvcrypt/data")
        .to_owned()
}

#[test]
fn one_fstab_recommendation_everywhere() {
    let line = recommended_fstab_line();
    for f in [
        "docs/AGENT.md",
        "examples/fstab",
        "systemd/kvcrypt-agent.service",
        "systemd/kvcrypt.target",
    ] {
        let text = std::fs::read_to_string(root().join(f)).unwrap();
        let found = text
            .lines()
            .map(|l| l.trim_start_matches('#').trim())
            .filter(|l| l.starts_with("/dev/disk/by-kvcrypt/"))
            .collect::<Vec<_>>();
        assert_eq!(
            found,
            vec![line.as_str()],
            "{f} must give exactly the README's fstab line"
        );
    }
    // The advice that turned `systemctl restart kvcrypt-agent` into an outage is gone.
    for f in [
        "README.md",
        "docs/AGENT.md",
        "examples/fstab",
        "systemd/kvcrypt-agent.service",
    ] {
        let text = std::fs::read_to_string(root().join(f)).unwrap();
        for l in text.lines().map(|l| l.trim_start_matches('#').trim()) {
            assert!(
                !(l.starts_with("/dev/") && l.contains("x-systemd.requires=kvcrypt-agent")),
                "{f} gives an fstab line with x-systemd.requires=kvcrypt-agent.service: {l}"
            );
        }
    }
}

/// systemd's own fstab generator turns the recommended line into a mount wanted by the served
/// device (so it is mounted whenever the volume is served, boot never waits for it) and ordered
/// after the agent (unmounted before the agent stops).
#[test]
fn fstab_recommendation_makes_the_device_pull_the_mount() {
    let generator = Path::new("/lib/systemd/system-generators/systemd-fstab-generator");
    if !generator.exists() {
        eprintln!("no systemd-fstab-generator; skipping (scripts/setup.sh installs systemd)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let fstab = d.path().join("fstab");
    std::fs::write(&fstab, format!("{}\n", recommended_fstab_line())).unwrap();
    let out = d.path().join("out");
    for sub in ["out", "early", "late"] {
        std::fs::create_dir(d.path().join(sub)).unwrap();
    }
    let st = Command::new(generator)
        .arg(&out)
        .arg(d.path().join("early"))
        .arg(d.path().join("late"))
        .env("SYSTEMD_FSTAB", &fstab)
        .env("SYSTEMD_PROC_CMDLINE", "")
        .env("SYSTEMD_LOG_LEVEL", "err")
        .status()
        .unwrap();
    assert!(st.success(), "systemd-fstab-generator failed");
    let wants = out.join("dev-disk-by\\x2dkvcrypt-data.device.wants/srv-data.mount");
    assert!(wants.exists(), "the device does not pull in srv-data.mount");
    for t in ["local-fs.target", "remote-fs.target"] {
        assert!(
            !out.join(format!("{t}.wants/srv-data.mount")).exists()
                && !out.join(format!("{t}.requires/srv-data.mount")).exists(),
            "boot would wait for the vault: {t} pulls in the mount"
        );
    }
    // No ordering cycle with the system's own units (the generated mount, our units and
    // systemd's, as systemd-analyze verify sees them): without _netdev the mount sat before
    // local-fs.target and after the agent, a cycle through sysinit.target.
    let sysunits = Path::new("/lib/systemd/system");
    if sysunits.join("sysinit.target").exists() {
        let r = d.path().join("root");
        std::fs::create_dir_all(r.join("lib/systemd")).unwrap();
        let cp = Command::new("cp")
            .arg("-a")
            .arg(sysunits)
            .arg(r.join("lib/systemd/"))
            .status()
            .unwrap();
        assert!(cp.success());
        let etc = staged_units(&r);
        let cp = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", out.display()))
            .arg(&etc)
            .status()
            .unwrap();
        assert!(cp.success());
        let v = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", r.display()))
            .args(["srv-data.mount", "kvcrypt-agent.service", "shutdown.target"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&v.stderr);
        assert!(
            !err.contains("ordering cycle"),
            "the recommended fstab line makes an ordering cycle:\n{err}"
        );
    }
    let unit = std::fs::read_to_string(out.join("srv-data.mount")).unwrap();
    assert!(
        unit.lines().any(|l| l == "After=kvcrypt-agent.service"),
        "not ordered after the agent:\n{unit}"
    );
    assert!(
        !unit.contains("Requires=kvcrypt-agent") && !unit.contains("BindsTo=kvcrypt-agent"),
        "a restart of the agent would unmount it:\n{unit}"
    );
}

/// What the system test found the workers need under systemd, for both units that start
/// workers (the agent, and the attach unit when no agent runs): their private mount namespace
/// (RestrictNamespaces=yes made every worker fail), memfd_secret for key pages (not in
/// @system-service), refused calls failing with EPERM instead of SIGSYS, and /run/kvcrypt
/// created by the unit itself (ReadWritePaths= on a missing directory: 226/NAMESPACE).
#[test]
fn units_allow_what_workers_need() {
    for u in ["kvcrypt-agent.service", "kvcrypt-attach@.service"] {
        let text = std::fs::read_to_string(root().join("systemd").join(u)).unwrap();
        let values = |key: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix(&format!("{key}=")))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(values("RestrictNamespaces"), ["mnt"], "{u}");
        assert!(
            values("SystemCallFilter")
                .iter()
                .any(|v| !v.starts_with('~') && v.split_whitespace().any(|c| c == "memfd_secret")),
            "{u}: memfd_secret not allowed"
        );
        assert_eq!(values("SystemCallErrorNumber"), ["EPERM"], "{u}");
        assert_eq!(values("RuntimeDirectory"), ["kvcrypt"], "{u}");
        assert_eq!(values("RuntimeDirectoryPreserve"), ["yes"], "{u}");
        assert_eq!(
            values("KillMode"),
            ["process"],
            "{u}: workers must outlive it"
        );
        assert!(
            values("ReadWritePaths")
                .iter()
                .any(|v| v == "/sys/devices/virtual/block"),
            "{u}: udevadm trigger cannot write the served devices' uevent files"
        );
    }
}
