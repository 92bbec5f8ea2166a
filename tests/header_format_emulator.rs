//! End to end: `kvcrypt format`, `probe`, `header dump --dump-master-key`, `rewrap` through the
//! real Key Vault provider against the in-process Key Vault emulator (TLS, Entra ID tokens).

use kvcrypt_crypto::XtsCipher;
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_kv_emulator::Op;
use kvcrypt_testkit::MIB;
use kvcrypt_testkit::cli::{Cli, Run};
use kvcrypt_testkit::emulator::{Kv, VAULT};

/// The volume key `header dump --dump-master-key` prints, or the failed run.
fn master_key(cli: &Cli, dev: &str) -> Result<VolumeKey, Run> {
    let out = cli.dump_master_key(dev);
    if out.code != Some(0) {
        return Err(out);
    }
    Ok(kvcrypt_testkit::keys::vmk(&out.master_key_hex()))
}

#[test]
fn format_dump_rewrap_against_the_emulator() {
    // Root is needed for --dump-master-key (CI runs as root).
    let euid = kvcrypt_host::process::euid();
    assert_eq!(euid, 0, "this test runs as root, like CI");
    let kv = Kv::start();
    let v1 = kv.emu.create_key("disk-kek", "RSA", Some(2048)).unwrap();
    let p = kv.principal("kvcrypt-host", &[Op::Get, Op::Wrap, Op::Unwrap]);
    let cfg = kv.config_file(
        &p,
        &format!(
            "keys = [\"https://{VAULT}/keys/disk-kek\"]\nattempt_timeout_ms = 2000\n\
             deadline_ms = 10000\nmax_retries = 1\n"
        ),
    );
    let cli = Cli::new(env!("CARGO_BIN_EXE_kvcrypt")).config(&cfg);
    let dev = kvcrypt_testkit::volume::sized_file(kv.dir.path(), "disk.img", 16 * MIB);
    let devs = dev.to_str().unwrap();
    let key_id = format!("https://{VAULT}/keys/disk-kek");

    let out = cli.run(&[
        "format", devs, "--key-id", &key_id, "--label", "e2e", "--wipe",
    ]);
    let text = out.ok();
    let l = kvcrypt_header_io::read(&dev).unwrap();
    assert!(text.contains(&l.uuid.to_string()), "{text}");
    assert_eq!(l.slots.len(), 1);
    assert!(
        l.slots[0].key_id.starts_with(&format!("{key_id}/")),
        "versioned: {}",
        l.slots[0].key_id
    );
    assert!(
        v1.ends_with(l.slots[0].key_id.rsplit('/').next().unwrap()),
        "{v1} vs {}",
        l.slots[0].key_id
    );
    assert_eq!(l.slots[0].algorithm, "RSA-OAEP-256");

    let probe = cli.run(&["probe", devs]).ok();
    assert!(
        probe.contains("ID_FS_TYPE=kvcrypt\n") && probe.contains("ID_FS_LABEL=e2e\n"),
        "{probe}"
    );

    // The unwrapped master key passes the key check, and the wiped data area decrypts to zeros.
    let vmk = master_key(&cli, devs).unwrap_or_else(|o| panic!("{}", o.stderr));
    l.verify_key(&vmk).unwrap();
    // Format v2: the slot carries an access check wrapped by the same key, and the header's
    // digest is that of the secret derived from this VMK.
    assert_eq!(l.version, 2);
    assert!(l.slots[0].check.as_ref().is_some_and(|c| !c.is_empty()));
    l.verify_access_secret(kvcrypt_crypto::kdf::access_secret(&vmk).expose())
        .unwrap();
    let mut sector = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&dev).unwrap(),
        &mut sector,
        MIB + 7 * 4096,
    )
    .unwrap();
    assert!(sector.iter().any(|&b| b != 0));
    XtsCipher::new(&vmk)
        .decrypt_sectors(&mut sector, 7, 4096)
        .unwrap();
    assert!(sector.iter().all(|&b| b == 0));

    // A second format is refused without --yes (exit 10), and the volume is unchanged.
    let again = cli.run(&["format", devs, "--key-id", &key_id]);
    again.code(10);
    assert_eq!(kvcrypt_header_io::read(&dev).unwrap().uuid, l.uuid);

    // Rotate the key, rewrap to the latest version and drop the old slot.
    let v2 = kv.emu.create_key("disk-kek", "RSA", Some(2048)).unwrap();
    assert_ne!(v1, v2);
    cli.run(&["rewrap", devs, "--remove-slot", "0"]).ok();
    let l2 = kvcrypt_header_io::read(&dev).unwrap();
    assert_eq!(l2.slots.len(), 1);
    assert_eq!(l2.slots[0].id, 1);
    assert!(
        v2.ends_with(l2.slots[0].key_id.rsplit('/').next().unwrap()),
        "{v2} vs {}",
        l2.slots[0].key_id
    );
    assert!(l2.sequence > l.sequence);
    let vmk2 = master_key(&cli, devs).unwrap_or_else(|o| panic!("{}", o.stderr));
    assert_eq!(vmk2.expose(), vmk.expose(), "rewrap keeps the volume key");

    // Revoked unwrap permission: exit 5 (access denied).
    kv.emu.revoke(&p.client_id, &[Op::Unwrap], None).unwrap();
    let denied = master_key(&cli, devs).expect_err("denied");
    denied.code(5);

    // Missing config file: exit 7 (configuration).
    let missing = cli
        .config(kv.dir.path().join("nope.toml"))
        .run(&["rewrap", devs]);
    missing.code(7);
}
