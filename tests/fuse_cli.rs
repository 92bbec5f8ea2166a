//! `kvcrypt format` / `open --transport fuse` / `close` through the real Key Vault provider
//! against the in-process emulator: the operator's path to a plaintext block device.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kvcrypt_datapath::engine::AlignedBuf;
use kvcrypt_kv_emulator::Op;
use kvcrypt_testkit::cli::Cli;
use kvcrypt_testkit::emulator::{Kv, VAULT};
use kvcrypt_testkit::fuse::prelude::*;

#[test]
fn format_open_write_close_reopen_through_the_cli() {
    if skip_without_fuse_loop() {
        return;
    }
    let name = "t-fuse-cli";
    let _cleanup = Cleanup::worker(name);
    let kv = Kv::start();
    kv.emu.create_key("disk-kek", "RSA", Some(2048)).unwrap();
    let p = kv.principal("kvcrypt-host", &[Op::Get, Op::Wrap, Op::Unwrap]);
    let cfg = kv.config_file(&p, &format!("keys = [\"https://{VAULT}/keys/disk-kek\"]"));
    let cli = Cli::new(env!("CARGO_BIN_EXE_kvcrypt")).config(&cfg);
    let img = kvcrypt_testkit::volume::sized_file(kv.dir.path(), "disk.img", 48 * MIB);
    let imgs = img.to_str().unwrap();
    let open = [
        "open",
        imgs,
        name,
        "--transport",
        "fuse",
        "--no-access-checks",
    ];
    cli.run(&[
        "format",
        imgs,
        "--key-id",
        &format!("https://{VAULT}/keys/disk-kek"),
        "--yes",
    ])
    .ok();

    let dev = cli.run(&open).ok().trim().to_string();
    assert!(
        dev.starts_with("/dev/loop"),
        "open prints the block device: {dev}"
    );
    let state = kvcrypt::worker::read_state(name).expect("state file");
    assert_eq!(state.block_device, PathBuf::from(&dev));
    assert_eq!(state.transport, "fuse");

    // The same name again: busy (exit code 10).
    let again = cli.run(&open);
    again.code(10);

    let data = pattern(2 * MIB as usize, 5);
    let mut buf = AlignedBuf::new(data.len());
    buf.copy_from_slice(&data);
    let f = open_direct(Path::new(&dev));
    f.write_all_at(&buf, 7 * MIB).unwrap();
    f.sync_all().unwrap();
    drop(f);
    cli.run(&["close", name]).ok();
    wait_gone(state.pid);
    // Closing again: no such volume (exit code 11).
    cli.run(&["close", name]).code(11);

    // Read-only reopen shows the same bytes and refuses writes.
    let dev = cli
        .run(&[&open[..], &["--read-only"]].concat())
        .ok()
        .trim()
        .to_string();
    let state = kvcrypt::worker::read_state(name).expect("state file");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .unwrap();
    let mut back = AlignedBuf::new(data.len());
    f.read_exact_at(&mut back, 7 * MIB).unwrap();
    assert!(back[..] == data[..], "data differs after reopen");
    drop(f);
    let ro = std::fs::read_to_string(format!("/sys/block/{}/ro", dev.trim_start_matches("/dev/")))
        .unwrap();
    assert_eq!(ro.trim(), "1", "the loop device is marked read-only");
    if let Ok(w) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
    {
        assert!(
            w.write_all_at(&buf, 0).is_err(),
            "read-only device accepted a write"
        );
    }
    cli.run(&["close", name]).ok();
    wait_gone(state.pid);

    // Without access to the key, open fails with the access-denied exit code and serves nothing.
    let stranger = kv.principal("stranger", &[Op::Get]);
    let cfg2 = kv.config_file(
        &stranger,
        &format!("keys = [\"https://{VAULT}/keys/disk-kek\"]"),
    );
    let denied = cli.config(&cfg2).run(&open);
    denied.code(5);
    assert!(kvcrypt::worker::read_state(name).is_none());
}
