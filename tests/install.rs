//! `make install DESTDIR=…` puts every file where the units and docs say, with paths rewritten.

use std::path::Path;
use std::process::Command;

use kvcrypt_testkit::env::have;

#[test]
fn make_install_stages_everything() {
    assert!(
        have("make"),
        "make is required (scripts/setup.sh installs build-essential)"
    );
    let dest = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("make")
        .current_dir(root)
        .arg("install")
        .arg(format!("DESTDIR={}", dest.path().display()))
        .arg("PREFIX=/usr/local")
        .arg(format!("KVCRYPT={}", env!("CARGO_BIN_EXE_kvcrypt")))
        .arg(format!(
            "EMULATOR={}",
            // Another package's binary: cargo builds every workspace binary for `cargo test`,
            // into the same directory.
            std::path::Path::new(env!("CARGO_BIN_EXE_kvcrypt"))
                .with_file_name("kvcrypt-kv-emulator")
                .display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make install failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let d = dest.path();
    for f in [
        "usr/local/sbin/kvcrypt",
        "usr/local/bin/kvcrypt-kv-emulator",
        "usr/local/lib/systemd/system/kvcrypt-agent.service",
        "usr/local/lib/systemd/system/kvcrypt-attach@.service",
        "usr/local/lib/systemd/system/kvcrypt.target",
        "usr/local/lib/udev/rules.d/60-kvcrypt.rules",
        "usr/local/lib/modules-load.d/kvcrypt.conf",
        "usr/local/share/man/man1/kvcrypt.1",
        "usr/local/share/man/man1/kvcrypt-agent.1",
        "usr/local/share/bash-completion/completions/kvcrypt",
        "usr/local/share/zsh/vendor-completions/_kvcrypt",
        "usr/local/share/fish/vendor_completions.d/kvcrypt.fish",
        "usr/local/share/doc/kvcrypt/kvcrypt.toml.example",
        "etc/kvcrypt/kvcrypt.toml.example",
    ] {
        let p = d.join(f);
        let m = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{f} missing: {e}"));
        assert!(m.len() > 0, "{f} is empty");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.join("usr/local/sbin/kvcrypt")), 0o755);
    assert_eq!(mode(&d.join("etc/kvcrypt")), 0o700);

    // Paths follow PREFIX.
    let unit =
        std::fs::read_to_string(d.join("usr/local/lib/systemd/system/kvcrypt-agent.service"))
            .unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/sbin/kvcrypt agent"),
        "{unit}"
    );
    assert!(!unit.contains("/usr/sbin/kvcrypt"));
    let rules =
        std::fs::read_to_string(d.join("usr/local/lib/udev/rules.d/60-kvcrypt.rules")).unwrap();
    assert!(
        rules.contains("IMPORT{program}=\"/usr/local/sbin/kvcrypt probe $devnode\""),
        "{rules}"
    );
    // The installed binary is the one we built and runs.
    let v = Command::new(d.join("usr/local/sbin/kvcrypt"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("kvcrypt "));
    let bash =
        std::fs::read_to_string(d.join("usr/local/share/bash-completion/completions/kvcrypt"))
            .unwrap();
    assert!(bash.contains("kvcrypt"));
    // The example config is the documented one and parses.
    let ex = std::fs::read_to_string(d.join("usr/local/share/doc/kvcrypt/kvcrypt.toml.example"))
        .unwrap();
    kvcrypt::agent::config::Config::parse(Path::new("example"), &ex).unwrap();
}
