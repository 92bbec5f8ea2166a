//! kvcrypt as installed, under a real systemd (PID 1) and udev: boots a Debian 12 guest with
//! Debian's 6.12 cloud kernel under qemu TCG, kvcrypt installed with `make install DESTDIR=`,
//! and runs the checks of `tests/system/` for both transports (ublk, FUSE + loop). See
//! `tests/system/README.md`.
//!
//! Needs root, qemu-system-x86, mmdebstrap and the Debian mirror (for the cached root
//! filesystem, `target/system-vm/cache`). With `CI=true` a missing tool is a failure; elsewhere
//! the test is skipped with a loud message. `KVCRYPT_SYSTEM_TEST=0` skips it on purpose.

use std::path::Path;
use std::process::Command;

use kvcrypt_testkit::env::{have, in_ci};

#[test]
fn kvcrypt_under_systemd_and_udev() {
    if std::env::var("KVCRYPT_SYSTEM_TEST").is_ok_and(|v| v == "0") {
        assert!(!in_ci(), "KVCRYPT_SYSTEM_TEST=0 is not allowed in CI");
        eprintln!("\n!!!! SKIPPING the system VM test: KVCRYPT_SYSTEM_TEST=0 !!!!\n");
        return;
    }
    let missing: Vec<&str> = [
        "qemu-system-x86_64",
        "mmdebstrap",
        "jq",
        "unshare",
        "journalctl",
    ]
    .into_iter()
    .filter(|t| !have(t))
    .collect();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !missing.is_empty() || !root {
        assert!(
            !in_ci(),
            "CI=true but the system VM test cannot run: missing {missing:?}, root: {root} \
             (scripts/setup.sh installs the tools; run as root)"
        );
        eprintln!(
            "\n!!!! SKIPPING the system VM test: missing {missing:?}, root: {root}. \
             Run scripts/setup.sh as root (it is mandatory in CI). !!!!\n"
        );
        return;
    }
    let bindir = Path::new(env!("CARGO_BIN_EXE_kvcrypt"))
        .parent()
        .expect("binary directory");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new("python3")
        .arg(repo.join("tests/system/run.py"))
        .arg("--bindir")
        .arg(bindir)
        .status()
        .expect("could not run tests/system/run.py");
    assert!(
        status.success(),
        "system VM test failed ({status}); logs under target/system-vm/run-*/"
    );
}
