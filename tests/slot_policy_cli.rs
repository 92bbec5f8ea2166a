//! End to end: split slot policies (format v4) through the `kvcrypt` binary against the Key
//! Vault emulator serving three vaults by host name (`vault-a`, `vault-b`, `vault-c`
//! `.vault.azure.net`, one emulator, one key in each). A 2-of-3 volume unlocks (`header dump
//! --dump-master-key`) with every key, with one vault's key disabled, not with two (exit 5,
//! access denied), and again after they are enabled; an `all` volume over two vaults locks when
//! either key is disabled. The volume key is the same in every successful unlock. `format`
//! refuses two keys of one vault and bad thresholds before writing anything.

use kvcrypt_kv_emulator::Op;
use kvcrypt_testkit::MIB;
use kvcrypt_testkit::cli::Cli;
use kvcrypt_testkit::emulator::{Kv, key_id};

const VA: &str = "vault-a.vault.azure.net";
const VB: &str = "vault-b.vault.azure.net";
const VC: &str = "vault-c.vault.azure.net";

/// Key name in each vault (the emulator's key store is shared by its host names, so each
/// vault's key has its own name and disabling it affects that vault only).
fn name(host: &str) -> &'static str {
    match host {
        VA => "share-a",
        VB => "share-b",
        _ => "share-c",
    }
}

fn cli(kv: &Kv) -> Cli {
    let p = kv.principal("kvcrypt-host", &[Op::Get, Op::Wrap, Op::Unwrap]);
    let port = kv.emu.port();
    let resolve: Vec<String> = [VA, VB, VC]
        .iter()
        .map(|h| format!("{h}:443:127.0.0.1:{port}"))
        .collect();
    let pins: Vec<String> = [VA, VB, VC]
        .iter()
        .map(|h| format!("{:?}", key_id(h, name(h))))
        .chain([format!("{:?}", key_id(VA, "other"))])
        .collect();
    let cfg = kv.config_file_resolving(
        &p,
        &format!(
            "keys = [{}]\nattempt_timeout_ms = 2000\ndeadline_ms = 6000\nmax_retries = 1\n",
            pins.join(", ")
        ),
        &resolve,
    );
    Cli::new(env!("CARGO_BIN_EXE_kvcrypt")).config(cfg)
}

fn enable(kv: &Kv, host: &str, on: bool) {
    kv.emu.set_key_enabled(name(host), None, on).unwrap();
}

#[test]
fn two_of_three_and_all_lock_and_unlock_as_their_policy_says() {
    assert_eq!(
        kvcrypt_host::process::euid(),
        0,
        "--dump-master-key needs root (CI runs as root)"
    );
    let kv = Kv::start();
    for h in [VA, VB, VC] {
        kv.emu.create_key(name(h), "RSA", Some(2048)).unwrap();
    }
    kv.emu.create_key("other", "RSA", Some(2048)).unwrap();
    let cli = cli(&kv);
    let dir = tempfile::tempdir().unwrap();
    let dev = kvcrypt_testkit::volume::sized_file(dir.path(), "split.img", 8 * MIB);
    let devs = dev.to_str().unwrap();
    let (a, b, c) = (
        key_id(VA, name(VA)),
        key_id(VB, name(VB)),
        key_id(VC, name(VC)),
    );

    // Refused before anything is written (exit 2): two keys of one vault, bad thresholds.
    let same_vault = key_id(VA, "other");
    let refusals: [(&[&str], &str); 6] = [
        (
            &["--key-id", &a, "--key-id", &same_vault, "--policy", "all"],
            "same vault",
        ),
        (
            &[
                "--key-id", &a, "--key-id", &b, "--key-id", &c, "--policy", "k-of-n",
            ],
            "needs --threshold",
        ),
        (
            &[
                "--key-id",
                &a,
                "--key-id",
                &b,
                "--key-id",
                &c,
                "--policy",
                "k-of-n",
                "--threshold",
                "1",
            ],
            "out of range",
        ),
        (
            &[
                "--key-id",
                &a,
                "--key-id",
                &b,
                "--key-id",
                &c,
                "--policy",
                "k-of-n",
                "--threshold",
                "4",
            ],
            "out of range",
        ),
        (&["--key-id", &a, "--policy", "all"], "needs 2 to 16"),
        (
            &[
                "--key-id",
                &a,
                "--key-id",
                &b,
                "--policy",
                "all",
                "--threshold",
                "2",
            ],
            "k-of-n only",
        ),
    ];
    for (args, why) in refusals {
        let mut full = vec!["format", devs];
        full.extend_from_slice(args);
        cli.run(&full).fails(2, why);
    }
    assert!(kvcrypt_header_io::read(&dev).is_err(), "nothing written");

    // 2-of-3 over three vaults.
    let out = cli
        .run(&[
            "format",
            devs,
            "--key-id",
            &a,
            "--key-id",
            &b,
            "--key-id",
            &c,
            "--policy",
            "k-of-n",
            "--threshold",
            "2",
        ])
        .ok();
    assert!(out.contains("policy k-of-n: 2 of 3 shares needed"), "{out}");
    let l = kvcrypt_header_io::read(&dev).unwrap();
    assert_eq!(l.version, 4, "a split header is format v4");
    assert_eq!(l.policy, kvcrypt_format::SlotPolicy::KOfN { k: 2 });
    assert_eq!(
        l.slots.iter().map(|s| s.share).collect::<Vec<_>>(),
        vec![Some(1), Some(2), Some(3)]
    );
    for (s, host) in l.slots.iter().zip([VA, VB, VC]) {
        assert!(
            s.key_id.starts_with(&format!("https://{host}/keys/")),
            "{s:?}"
        );
        assert!(s.check.is_some(), "every share slot has its access check");
    }
    let text = cli.run(&["header", "dump", devs]).ok();
    assert!(
        text.contains("policy:        k-of-n: 2 of 3 shares needed")
            && text.contains("share:       2 of 3"),
        "{text}"
    );
    let json = cli.run(&["header", "dump", "--json", devs]).json();
    assert_eq!(json["policy"]["kind"], "k-of-n");
    assert_eq!(json["policy"]["threshold"], 2);
    assert_eq!(json["policy"]["shares"], 3);
    assert_eq!(json["keyslots"][2]["share"], 3);

    let vmk = cli.dump_master_key(devs).master_key_hex();
    assert_eq!(vmk.len(), 128);
    // One vault's key disabled: the other two still unlock, to the same key.
    enable(&kv, VA, false);
    assert_eq!(cli.dump_master_key(devs).master_key_hex(), vmk);
    // Two disabled: access denied (exit 5), naming the keys and the count.
    enable(&kv, VB, false);
    let locked = cli.dump_master_key(devs);
    locked.fails(5, "obtained 1 of the 2 shares needed");
    assert!(
        locked.stderr.contains(name(VA)) && locked.stderr.contains(name(VB)),
        "{}",
        locked.stderr
    );
    assert!(!locked.out().contains(&vmk) && !locked.stderr.contains(&vmk));
    // Restored: unlocks again, same key.
    enable(&kv, VA, true);
    assert_eq!(cli.dump_master_key(devs).master_key_hex(), vmk);
    enable(&kv, VB, true);
    assert_eq!(cli.dump_master_key(devs).master_key_hex(), vmk);
    // Rewrap: nothing to rotate yet; changing a share's key is refused, pointing at format.
    let out = cli.run(&["rewrap", devs]).ok();
    assert!(out.contains("Nothing changed"), "{out}");
    cli.run(&["rewrap", devs, "--key-id", &same_vault])
        .fails(2, "kvcrypt format");
    cli.run(&["rewrap", devs, "--no-add", "--remove-slot", "1"])
        .fails(2, "only slot holding share 2");

    // `all` over two vaults: either key disabled locks the volume.
    let dev2 = kvcrypt_testkit::volume::sized_file(dir.path(), "all.img", 8 * MIB);
    let devs2 = dev2.to_str().unwrap();
    let out = cli
        .run(&[
            "format", devs2, "--key-id", &a, "--key-id", &c, "--policy", "all",
        ])
        .ok();
    assert!(out.contains("policy all: 2 of 2 shares needed"), "{out}");
    let vmk2 = cli.dump_master_key(devs2).master_key_hex();
    assert_ne!(vmk2, vmk);
    for host in [VA, VC] {
        enable(&kv, host, false);
        cli.dump_master_key(devs2)
            .fails(5, "obtained 1 of the 2 shares needed");
        enable(&kv, host, true);
        assert_eq!(cli.dump_master_key(devs2).master_key_hex(), vmk2);
    }
    // Policy `any` with several keys: one slot per key, each wrapping the whole key (v2).
    let dev3 = kvcrypt_testkit::volume::sized_file(dir.path(), "any.img", 8 * MIB);
    let devs3 = dev3.to_str().unwrap();
    cli.run(&["format", devs3, "--key-id", &a, "--key-id", &b])
        .ok();
    let l3 = kvcrypt_header_io::read(&dev3).unwrap();
    assert_eq!((l3.version, l3.slots.len()), (2, 2));
    assert!(l3.slots.iter().all(|s| s.share.is_none()));
    let vmk3 = cli.dump_master_key(devs3).master_key_hex();
    enable(&kv, VA, false);
    assert_eq!(cli.dump_master_key(devs3).master_key_hex(), vmk3);
    enable(&kv, VB, false);
    cli.dump_master_key(devs3).code(5);
    enable(&kv, VA, true);
    enable(&kv, VB, true);

    // 2-of-3 with a customer-held recovery slot (v4 with it): the recovery slot wraps the whole
    // key, so `recover` alone gives the same key; `recover --rewrap-key` would add a whole-key
    // Key Vault slot to a split header and is refused.
    let sk = dir.path().join("rec.key");
    let pk = dir.path().join("rec.pub");
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}");
    };
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:3072",
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
    let dev4 = kvcrypt_testkit::volume::sized_file(dir.path(), "rec.img", 8 * MIB);
    let devs4 = dev4.to_str().unwrap();
    cli.run(&[
        "format",
        devs4,
        "--key-id",
        &a,
        "--key-id",
        &b,
        "--key-id",
        &c,
        "--policy",
        "k-of-n",
        "--threshold",
        "2",
        "--recovery-public-key",
        pk.to_str().unwrap(),
    ])
    .ok();
    let l4 = kvcrypt_header_io::read(&dev4).unwrap();
    assert_eq!(l4.version, 4);
    let r = l4.recovery_slot().expect("recovery slot");
    assert_eq!((r.id, r.share), (3, None));
    let vmk4 = cli.dump_master_key(devs4).master_key_hex();
    let rec = cli.run(&[
        "recover",
        devs4,
        "--private-key",
        sk.to_str().unwrap(),
        "--print-dm-crypt",
        "--json",
        "--yes",
    ]);
    assert_eq!(rec.master_key_hex(), vmk4);
    cli.run(&[
        "recover",
        devs4,
        "--private-key",
        sk.to_str().unwrap(),
        "--rewrap-key",
        &a,
        "--yes",
    ])
    .fails(2, "not supported on a split volume");
    assert_eq!(
        kvcrypt_header_io::read(&dev4).unwrap().slots.len(),
        4,
        "nothing added"
    );
}
