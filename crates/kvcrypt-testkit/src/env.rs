//! Whether a test can run on this machine: root, CI, the kernel facilities, the tools.

use std::path::Path;

/// Whether the tests run as root (loop devices, FUSE, mounts need it; CI runs as root).
pub fn is_root() -> bool {
    kvcrypt_host::process::running_as_root()
}

/// True under CI (`CI=true`, as `.ci/run` sets it): a test that cannot run there must fail, not
/// skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Prints a loud skip note (the test then returns early and counts as passed, so the note is
/// what tells a reader it did not run).
pub fn skip(why: &str) {
    eprintln!("\n!!! SKIPPING: {why} !!!\n");
}

/// Whether `tool` is a file in a PATH directory (looked up directly: no shell needed).
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Returns true (and prints why) if the kernel facilities for the FUSE+loop path are missing.
pub fn skip_without_fuse_loop() -> bool {
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            skip(&format!(
                "{dev} is missing on this machine; the FUSE+loop data path cannot be tested"
            ));
            return true;
        }
    }
    if !is_root() {
        skip("FUSE+loop tests need root (CI runs as root)");
        return true;
    }
    false
}
