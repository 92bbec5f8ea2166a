//! End to end: `kvcrypt format`, `probe`, `header dump --dump-master-key`, `rewrap` through the
//! real Key Vault provider against the in-process Key Vault emulator (TLS, Entra ID tokens).

mod kvtest;

use std::path::Path;
use std::process::Output;

use kvcrypt_crypto::XtsCipher;
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_format as header;
use kvcrypt_kv_emulator::Op;
use kvtest::{Kv, VAULT, kvcrypt_cli as run, ok};

const MIB: u64 = 1024 * 1024;

fn master_key(cfg: &Path, dev: &str) -> Result<VolumeKey, Output> {
    let out = run(
        cfg,
        &[
            "header",
            "dump",
            "--json",
            "--dump-master-key",
            "--yes-i-understand",
            dev,
        ],
    );
    if out.status.code() != Some(0) {
        return Err(out);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hex = v["master_key_hex"].as_str().unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    Ok(VolumeKey::from_slice(&bytes).unwrap())
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
    let dev = kv.dir.path().join("disk.img");
    std::fs::File::create(&dev)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let devs = dev.to_str().unwrap();
    let key_id = format!("https://{VAULT}/keys/disk-kek");

    let out = run(
        &cfg,
        &[
            "format", devs, "--key-id", &key_id, "--label", "e2e", "--wipe",
        ],
    );
    let text = ok(&out);
    let l = header::read(&dev).unwrap();
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

    let probe = ok(&run(&cfg, &["probe", devs]));
    assert!(
        probe.contains("ID_FS_TYPE=kvcrypt\n") && probe.contains("ID_FS_LABEL=e2e\n"),
        "{probe}"
    );

    // The unwrapped master key passes the key check, and the wiped data area decrypts to zeros.
    let vmk =
        master_key(&cfg, devs).unwrap_or_else(|o| panic!("{}", String::from_utf8_lossy(&o.stderr)));
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
    let again = run(&cfg, &["format", devs, "--key-id", &key_id]);
    assert_eq!(
        again.status.code(),
        Some(10),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(header::read(&dev).unwrap().uuid, l.uuid);

    // Rotate the key, rewrap to the latest version and drop the old slot.
    let v2 = kv.emu.create_key("disk-kek", "RSA", Some(2048)).unwrap();
    assert_ne!(v1, v2);
    ok(&run(&cfg, &["rewrap", devs, "--remove-slot", "0"]));
    let l2 = header::read(&dev).unwrap();
    assert_eq!(l2.slots.len(), 1);
    assert_eq!(l2.slots[0].id, 1);
    assert!(
        v2.ends_with(l2.slots[0].key_id.rsplit('/').next().unwrap()),
        "{v2} vs {}",
        l2.slots[0].key_id
    );
    assert!(l2.sequence > l.sequence);
    let vmk2 =
        master_key(&cfg, devs).unwrap_or_else(|o| panic!("{}", String::from_utf8_lossy(&o.stderr)));
    assert_eq!(vmk2.expose(), vmk.expose(), "rewrap keeps the volume key");

    // Revoked unwrap permission: exit 5 (access denied).
    kv.emu.revoke(&p.client_id, &[Op::Unwrap], None).unwrap();
    let denied = master_key(&cfg, devs).expect_err("denied");
    assert_eq!(
        denied.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );

    // Missing config file: exit 7 (configuration).
    let missing = run(&kv.dir.path().join("nope.toml"), &["rewrap", devs]);
    assert_eq!(
        missing.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}
