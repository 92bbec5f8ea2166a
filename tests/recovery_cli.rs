//! End to end: the customer-held recovery slot. `kvcrypt format --recovery-public-key` against
//! the Key Vault emulator; then, with the emulator gone and no configuration file at all,
//! `kvcrypt recover --print-dm-crypt` gives the same volume key `header dump --dump-master-key`
//! gave while the vault was there; `recover --rewrap-key` into a key of a new vault makes a slot
//! the normal unlock uses. Key pairs come from the `openssl` command line, as a customer would
//! make them (README §Recovery key).

use std::path::{Path, PathBuf};
use std::process::Command;

use kvcrypt_kv_emulator::Op;
use kvcrypt_testkit::MIB;
use kvcrypt_testkit::cli::Cli;
use kvcrypt_testkit::emulator::{Kv, VAULT};
use sha2::{Digest, Sha256};

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `openssl genpkey` a key pair of `bits` in `dir`: (private key PEM, public key PEM).
fn key_pair(dir: &Path, name: &str, bits: u32) -> (PathBuf, PathBuf) {
    let sk = dir.join(format!("{name}.key"));
    let pk = dir.join(format!("{name}.pub"));
    let bits_opt = format!("rsa_keygen_bits:{bits}");
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        &bits_opt,
        "-out",
        sk.to_str().unwrap(),
    ]);
    openssl(&[
        "pkey",
        "-in",
        sk.to_str().unwrap(),
        "-pubout",
        "-out",
        pk.to_str().unwrap(),
    ]);
    (sk, pk)
}

/// The fingerprint README §Recovery key tells the customer to compute.
fn fingerprint(pk: &Path) -> String {
    let der = openssl(&[
        "pkey",
        "-pubin",
        "-in",
        pk.to_str().unwrap(),
        "-outform",
        "DER",
    ]);
    let hex: String = Sha256::digest(&der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn vault_config(kv: &Kv, key: &str) -> PathBuf {
    let p = kv.principal("kvcrypt-host", &[Op::Get, Op::Wrap, Op::Unwrap]);
    kv.config_file(
        &p,
        &format!(
            "keys = [\"https://{VAULT}/keys/{key}\"]\nattempt_timeout_ms = 2000\n\
             deadline_ms = 10000\nmax_retries = 1\n"
        ),
    )
}

#[test]
fn recover_offline_with_the_customer_key_then_rewrap_into_a_new_vault() {
    // Root is needed for --dump-master-key (CI runs as root).
    assert_eq!(
        kvcrypt_host::process::euid(),
        0,
        "this test runs as root, like CI"
    );
    let keys = tempfile::tempdir().unwrap();
    let (rec_sk, rec_pk) = key_pair(keys.path(), "recovery", 3072);
    let (other_sk, other_pk) = key_pair(keys.path(), "other", 3072);
    let (_, small_pk) = key_pair(keys.path(), "small", 2048);
    let exe = env!("CARGO_BIN_EXE_kvcrypt");

    let kv = Kv::start();
    kv.emu.create_key("disk-kek", "RSA", Some(2048)).unwrap();
    let cli = Cli::new(exe).config(vault_config(&kv, "disk-kek"));
    let dev = kvcrypt_testkit::volume::sized_file(keys.path(), "disk.img", 16 * MIB);
    let devs = dev.to_str().unwrap();
    let key_id = format!("https://{VAULT}/keys/disk-kek");

    // A 2048-bit recovery key is refused before anything is written (exit 17).
    cli.run(&[
        "format",
        devs,
        "--key-id",
        &key_id,
        "--recovery-public-key",
        small_pk.to_str().unwrap(),
    ])
    .fails(
        17,
        "a 2048-bit RSA key; a recovery key must have 3072 or 4096 bits",
    );
    assert!(kvcrypt_header_io::read(&dev).is_err(), "nothing written");

    let out = cli
        .run(&[
            "format",
            devs,
            "--key-id",
            &key_id,
            "--recovery-public-key",
            rec_pk.to_str().unwrap(),
        ])
        .ok();
    assert!(out.contains("Recovery slot 1: sha256:"), "{out}");
    let l = kvcrypt_header_io::read(&dev).unwrap();
    assert_eq!(l.version, 3, "a header with a recovery slot is format v3");
    let r = l.recovery_slot().expect("recovery slot");
    assert_eq!(r.id, 1);
    assert_eq!(r.provider, "recovery-rsa");
    assert_eq!(r.key_id, fingerprint(&rec_pk), "the documented fingerprint");
    assert_eq!(r.algorithm, "RSA-OAEP-256");
    assert_eq!(r.wrapped.len(), 384);
    assert!(r.check.is_none());
    let wrapped = keys.path().join("wrapped.bin");
    std::fs::write(&wrapped, &r.wrapped).unwrap();
    let dump = cli.run(&["header", "dump", devs]).ok();
    assert!(
        dump.contains("slot 1: recovery (customer-held RSA key")
            && dump.contains(&format!("fingerprint: {}", r.key_id))
            && dump.contains("key size:    3072-bit RSA"),
        "{dump}"
    );

    // The volume key as the vault gives it (normal unlock: slot 0, never the recovery slot).
    let via_vault = cli.dump_master_key(devs);
    let vmk_hex = via_vault.master_key_hex();
    assert_eq!(via_vault.json()["master_key_slot"], 0);
    // docs/FORMAT.md §3.2 with another implementation: OpenSSL's RSA-OAEP, SHA-256 and
    // MGF1-SHA-256, empty label, decrypts the slot to the volume key.
    let plain = openssl(&[
        "pkeyutl",
        "-decrypt",
        "-inkey",
        rec_sk.to_str().unwrap(),
        "-in",
        wrapped.to_str().unwrap(),
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        "rsa_oaep_md:sha256",
        "-pkeyopt",
        "rsa_mgf1_md:sha256",
    ]);
    let plain_hex: String = plain.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(plain_hex, vmk_hex, "RSA-OAEP-256 of the VMK, as documented");

    // The vault is gone, and this machine has no kvcrypt configuration.
    let Kv {
        emu,
        dir: _vault_dir,
    } = kv;
    emu.shutdown();
    let offline = Cli::new(exe).config(keys.path().join("no-such-kvcrypt.toml"));
    let recover = |sk: &Path, extra: &[&str]| {
        let mut args = vec!["recover", devs, "--private-key", sk.to_str().unwrap()];
        args.extend_from_slice(extra);
        offline.run(&args)
    };
    let got = recover(&rec_sk, &["--print-dm-crypt", "--json", "--yes"]);
    assert_eq!(got.master_key_hex(), vmk_hex, "recovered the volume key");
    assert_eq!(got.json()["master_key_slot"], 1);
    // The same key as PKCS#1 ("RSA PRIVATE KEY", `openssl pkey -traditional`).
    let pkcs1 = keys.path().join("recovery-pkcs1.key");
    let rec = rec_sk.to_str().unwrap();
    openssl(&[
        "pkey",
        "-in",
        rec,
        "-traditional",
        "-out",
        pkcs1.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read_to_string(&pkcs1)
            .unwrap()
            .contains("BEGIN RSA PRIVATE KEY")
    );
    let got1 = recover(&pkcs1, &["--print-dm-crypt", "--json", "--yes"]);
    assert_eq!(got1.master_key_hex(), vmk_hex);
    let text = recover(&rec_sk, &["--print-dm-crypt", "--yes"]).ok();
    assert!(
        text.contains("master key (unwrapped from slot 1, hex):")
            && text.contains(&vmk_hex)
            && text.contains("cryptsetup open --type plain --cipher aes-xts-plain64"),
        "the output of header dump --dump-master-key: {text}"
    );
    // No terminal and no --yes: refused after the key was proven, nothing printed.
    let unconfirmed = recover(&rec_sk, &["--print-dm-crypt"]);
    unconfirmed.fails(2, "pass --yes to confirm non-interactively");
    assert!(unconfirmed.stdout.is_empty());
    // Another key pair: exit 8, named as such, and no key printed.
    let wrong = recover(&other_sk, &["--print-dm-crypt", "--yes"]);
    wrong.fails(8, "is not the volume's recovery key");
    assert!(wrong.stdout.is_empty() && !wrong.stderr.contains(&vmk_hex));
    // A public key where the private key belongs: exit 17.
    recover(&rec_pk, &["--print-dm-crypt", "--yes"]).fails(17, "no PEM private key");

    // A new vault (the old one is lost): recover into its key, then the normal unlock uses it.
    let kv2 = Kv::start();
    kv2.emu.create_key("new-kek", "RSA", Some(2048)).unwrap();
    let cli2 = Cli::new(exe).config(vault_config(&kv2, "new-kek"));
    let new_key = format!("https://{VAULT}/keys/new-kek");
    let out = cli2
        .run(&[
            "recover",
            devs,
            "--private-key",
            rec_sk.to_str().unwrap(),
            "--rewrap-key",
            &new_key,
            "--yes",
        ])
        .ok();
    assert!(out.contains("added key slot 2"), "{out}");
    let l2 = kvcrypt_header_io::read(&dev).unwrap();
    assert_eq!(l2.slots.len(), 3);
    assert!(l2.slots[2].key_id.starts_with(&format!("{new_key}/")));
    assert!(
        l2.slots[2].check.is_some(),
        "a full v2 slot with its access check"
    );
    assert_eq!(l2.recovery_slot().map(|s| s.id), Some(1), "kept");
    let unlocked = cli2.dump_master_key(devs);
    assert_eq!(unlocked.master_key_hex(), vmk_hex);
    assert_eq!(
        unlocked.json()["master_key_slot"],
        2,
        "the new slot unlocks"
    );

    // Replacing the recovery key needs --replace-recovery (exit 10 without); then the old
    // private key no longer opens the volume, the new one does.
    let other = other_pk.to_str().unwrap();
    cli2.run(&["rewrap", devs, "--recovery-public-key", other])
        .fails(10, "--replace-recovery");
    cli2.run(&[
        "rewrap",
        devs,
        "--recovery-public-key",
        other,
        "--replace-recovery",
    ])
    .ok();
    let l3 = kvcrypt_header_io::read(&dev).unwrap();
    assert_eq!(l3.slots.len(), 3, "one recovery slot replaced by another");
    assert_eq!(l3.recovery_slot().unwrap().key_id, fingerprint(&other_pk));
    recover(&rec_sk, &["--print-dm-crypt", "--yes"]).fails(8, "not the volume's recovery key");
    assert_eq!(
        recover(&other_sk, &["--print-dm-crypt", "--json", "--yes"]).master_key_hex(),
        vmk_hex
    );

    // Removing it as any slot: the header is v2 again, and recover says there is nothing.
    let id = l3.recovery_slot().unwrap().id.to_string();
    cli2.run(&["rewrap", devs, "--no-add", "--remove-slot", &id])
        .ok();
    assert_eq!(kvcrypt_header_io::read(&dev).unwrap().version, 2);
    recover(&other_sk, &["--print-dm-crypt", "--yes"]).fails(11, "has no recovery slot");
}
