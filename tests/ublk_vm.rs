//! The ublk transport inside a qemu VM (this host has no ublk): boots Debian's 6.12 cloud kernel
//! with a busybox initramfs carrying the release kvcrypt binaries and runs the guest scenarios in
//! `tests/vm/guest/` (format/open/ext4/verify, SIGKILL-and-recover). See `tests/vm/run-vm-test.sh`.
//!
//! Needs qemu-system-x86, busybox-static, cpio and the kernel package from the apt sources. With
//! `CI=true` a missing tool is a failure; elsewhere the test is skipped with a loud message.

use std::path::{Path, PathBuf};
use std::process::Command;

use kvcrypt_testkit::env::{have, in_ci};

/// Target directory this test binary was built into (`<target>/<profile>/kvcrypt`).
fn target_dir() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_kvcrypt"));
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

#[test]
fn ublk_transport_in_vm() {
    let missing: Vec<&str> = ["qemu-system-x86_64", "cpio", "busybox", "fio"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        assert!(
            !in_ci(),
            "CI=true but the ublk VM test cannot run: missing {missing:?} \
             (apt-get install qemu-system-x86 busybox-static cpio fio)"
        );
        eprintln!(
            "\n!!!! SKIPPING the ublk VM test: missing {missing:?}. Install qemu-system-x86, \
             busybox-static, cpio and fio to run it (it is mandatory in CI). !!!!\n"
        );
        return;
    }

    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("bash");
    cmd.arg(repo.join("tests/vm/run-vm-test.sh"));
    if std::env::var_os("KVCRYPT_VM_BINDIR").is_none() {
        if cfg!(debug_assertions) {
            // The guest needs optimised binaries (XTS under TCG is slow enough already): the
            // script builds the release profile. Its lock (`<target>/release`) differs from the
            // one this debug test run holds, so the nested build does not deadlock.
            cmd.env("CARGO_TARGET_DIR", target_dir());
        } else {
            // This test itself is a release build: cargo already built the binaries.
            cmd.env(
                "KVCRYPT_VM_BINDIR",
                Path::new(env!("CARGO_BIN_EXE_kvcrypt"))
                    .parent()
                    .unwrap_or(repo),
            );
        }
    }
    let status = cmd
        .status()
        .expect("could not run bash tests/vm/run-vm-test.sh");
    assert!(
        status.success(),
        "ublk VM test failed ({status}); console log: {}",
        std::env::var("KVCRYPT_VM_CACHE")
            .map(|c| format!("{c}/console.log"))
            .unwrap_or_else(|_| "target/vm-cache/console.log".into())
    );
}
