//! The `kvcrypt` binary's offline header commands: output and exit codes (crates/kvcrypt-exit).

use std::path::Path;
use std::process::{Command, Stdio};

use kvcrypt_format as header;
use kvcrypt_testkit::MIB;
use kvcrypt_testkit::keys::header_key as key;
use kvcrypt_testkit::volume::*;

use kvcrypt_testkit::cli::{Cli, Run};

/// `kvcrypt args` without a config file (the offline commands need none).
fn kvcrypt(args: &[&str]) -> Run {
    Cli::new(env!("CARGO_BIN_EXE_kvcrypt"))
        .env("KVCRYPT_CONFIG", "/nonexistent/kvcrypt.toml")
        .run(args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn probe_is_silent_and_nonzero_for_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let zeros = sized_file(dir.path(), "zeros.img", 4 * MIB);
    let missing = dir.path().join("missing.img");
    for p in [&zeros, &missing] {
        let out = kvcrypt(&["probe", s(p)]);
        assert_eq!(out.code, Some(3), "{}", p.display());
        out.silent();
    }
}

#[test]
fn probe_prints_udev_properties() {
    let dir = tempfile::tempdir().unwrap();
    let (p, h) = formatted(dir.path(), "v.img", 8 * MIB, "db disk\n1");
    let out = kvcrypt(&["probe", s(&p)]);
    out.code(0);
    let text = out.out();
    let want = format!(
        "ID_FS_TYPE=kvcrypt\nID_FS_USAGE=crypto\nID_FS_VERSION=2\nID_FS_UUID={u}\n\
         ID_FS_UUID_ENC={u}\nID_FS_LABEL=db_disk_1\nID_FS_LABEL_ENC=db\\x20disk\\x0a1\n",
        u = h.uuid
    );
    assert_eq!(text, want);
}

#[test]
fn dump_exit_codes_for_bad_devices() {
    let dir = tempfile::tempdir().unwrap();
    let zeros = sized_file(dir.path(), "zeros.img", 4 * MIB);
    let out = kvcrypt(&["header", "dump", s(&zeros)]);
    out.code(3);
    let err = &out.stderr;
    assert!(err.contains("not a kvcrypt volume"), "{err}");
    assert!(out.stdout.is_empty());

    let (p, _) = formatted(dir.path(), "v.img", 8 * MIB, "x");
    flip(&p, PRIMARY + 100);
    flip(&p, SECONDARY + 100);
    let out = kvcrypt(&["header", "dump", s(&p)]);
    out.code(4);
    let err = &out.stderr;
    assert!(err.contains("kvcrypt header restore"), "{err}");

    let out = kvcrypt(&["header", "dump", s(&dir.path().join("missing"))]);
    out.code(11);
}

#[test]
fn dump_json_describes_the_header_and_reports_damage() {
    let dir = tempfile::tempdir().unwrap();
    let (p, h) = formatted(dir.path(), "v.img", 8 * MIB, "x");
    write_at(&p, SECONDARY, &[0u8; 64]);
    let out = kvcrypt(&["header", "dump", "--json", s(&p)]);
    out.code(0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["uuid"], h.uuid.to_string());
    assert_eq!(v["version"], 2);
    assert_eq!(v["data_offset"], MIB);
    assert_eq!(v["sector_size"], 4096);
    assert_eq!(v["keyslots"][0]["key_id"], h.slots[0].key_id);
    assert_eq!(v["copies"][0]["in_use"], true);
    assert_eq!(v["copies"][1]["valid"], false);
    assert!(v["dm_crypt"].as_str().unwrap().contains("--offset 2048"));
    assert!(v.get("master_key_hex").is_none());
    let text = kvcrypt(&["header", "dump", s(&p)]);
    text.code(0);
    let t = text.out();
    assert!(
        t.contains(&h.uuid.to_string()) && t.contains("DAMAGED"),
        "{t}"
    );
    assert!(text.stderr.contains("repaired by the next header write"));
}

#[test]
fn backup_and_restore_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (p, h) = formatted(dir.path(), "v.img", 8 * MIB, "x");
    let bak = dir.path().join("v.hdr");
    let out = kvcrypt(&["header", "backup", s(&p), s(&bak)]);
    out.code(0);
    write_at(&p, 0, &vec![0u8; MIB as usize]);
    // No terminal and no --yes: refused, nothing written.
    let out = kvcrypt(&["header", "restore", s(&p), s(&bak)]);
    out.code(2);
    assert!(kvcrypt_header_io::probe(&p).is_none());
    let out = kvcrypt(&["header", "restore", "--yes", s(&p), s(&bak)]);
    out.code(0);
    let l = kvcrypt_header_io::read(&p).unwrap();
    assert_eq!(l.uuid, h.uuid);
    l.verify_key(&key(1)).unwrap();
}

/// Issue 10 (d9): `header backup` and `header dump` refused a truncated device ("device too
/// small"), so the one thing an operator should do first — save the header — was impossible;
/// and the backup file was created with the umask (0644 by default) though it holds the
/// wrapped keys.
#[test]
fn a_truncated_device_still_has_its_header_saved_and_dumped_and_backups_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (p, h) = formatted(dir.path(), "v.img", 8 * MIB, "x");
    // The device lost its last 3 MiB (a shrunk LV, a partial copy).
    set_len(&p, 5 * MIB);
    let bak = dir.path().join("v.hdr");
    // Under the common umask 022, which would leave the file world-readable.
    let out = Run::new(
        "header backup (umask 022)",
        Command::new("sh")
            .args(["-c", "umask 022 && exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_kvcrypt"))
            .args(["header", "backup", s(&p), s(&bak)])
            .env("KVCRYPT_CONFIG", "/nonexistent/kvcrypt.toml")
            .stdin(Stdio::null())
            .output()
            .unwrap(),
    );
    let err = &out.stderr;
    out.code(0);
    assert!(
        err.contains("is truncated") && err.contains("bytes missing"),
        "{err}"
    );
    let mode = std::fs::metadata(&bak).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "backup mode {mode:o}");
    assert_eq!(kvcrypt_header_io::read_backup(&bak).unwrap().uuid, h.uuid);
    let out = kvcrypt(&["header", "dump", "--json", s(&p)]);
    let err = &out.stderr;
    out.code(0);
    assert!(out.out().contains(&h.uuid.to_string()), "{}", out.out());
    assert!(err.contains("is truncated"), "{err}");
    // Serving still refuses it: the data area is not all there.
    assert!(matches!(
        kvcrypt_header_io::read(&p),
        Err(header::HeaderError::DeviceTooSmall { .. })
    ));
}
