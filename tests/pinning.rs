//! Key pinning end to end: the configuration (`keys = [...]`), never the disk, decides which
//! Key Vault keys may unlock a volume and which host kvcrypt talks to. Headers are tampered the
//! way an attacker who can write the disk would (key ids rewritten, checksums fixed; the MAC
//! is only checked after an unwrap), and the emulator's request log and a loopback listener
//! standing in for the attacker's host prove that no request was sent.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvcrypt_format as header;
use kvcrypt_kv_emulator::Op;
use kvcrypt_testkit::MIB;
use kvcrypt_testkit::cli::{Cli, Run};
use kvcrypt_testkit::emulator::{Kv, VAULT};
use kvcrypt_testkit::volume::{rewrite_metadata as rewrite_key_ids, sized_file};

const EXE: &str = env!("CARGO_BIN_EXE_kvcrypt");
const ATTACKER: &str = "attacker.example.com";

fn pin(name: &str) -> String {
    format!("https://{VAULT}/keys/{name}")
}

/// A loopback listener standing in for the host a tampered header names.
struct Trap {
    listener: TcpListener,
}

impl Trap {
    fn new() -> Trap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Trap { listener }
    }
    fn port(&self) -> u16 {
        self.listener.local_addr().unwrap().port()
    }
    /// Whether anything connected (a DNS-resolved connect to the attacker's host).
    fn was_contacted(&self) -> bool {
        self.listener.accept().is_ok()
    }
}

/// A config file for principal `p`: `[vault]` reaching the emulator (and sending the
/// attacker's host to `trap_port`), with `keys` lines as given and short timeouts, no retries.
fn config(kv: &Kv, p: &kvcrypt_kv_emulator::PrincipalInfo, keys: &str, trap_port: u16) -> PathBuf {
    kv.config_file_resolving(
        p,
        &format!("{keys}\nattempt_timeout_ms = 2000\ndeadline_ms = 6000\nmax_retries = 0"),
        &[format!("{ATTACKER}:443:127.0.0.1:{trap_port}")],
    )
}

/// An emulator with the RSA keys `keys`, a principal allowed to use them, a trap, and a config
/// pinning `disk-kek`.
struct Setup {
    kv: Kv,
    p: kvcrypt_kv_emulator::PrincipalInfo,
    trap: Trap,
    cfg: PathBuf,
    /// The version of the first key.
    first_version: String,
}

fn setup(keys: &[&str]) -> Setup {
    let kv = Kv::start();
    let versions: Vec<String> = keys
        .iter()
        .map(|k| kv.emu.create_key(k, "RSA", Some(2048)).unwrap())
        .collect();
    let p = kv.principal("host", &[Op::Get, Op::Wrap, Op::Unwrap]);
    let trap = Trap::new();
    let cfg = config(
        &kv,
        &p,
        &format!("keys = [\"{}\"]", pin("disk-kek")),
        trap.port(),
    );
    Setup {
        kv,
        p,
        trap,
        cfg,
        first_version: versions[0].clone(),
    }
}

/// A blank 16 MiB image in the emulator's directory.
fn image(kv: &Kv, name: &str) -> PathBuf {
    sized_file(kv.dir.path(), name, 16 * MIB)
}

/// `kvcrypt --config cfg args`.
fn run(cfg: &Path, args: &[&str]) -> Run {
    Cli::new(EXE).config(cfg).run(args)
}

/// The volume key `header dump --dump-master-key` prints with `cfg` (the run must succeed).
fn master_key(cfg: &Path, dev: &Path) -> String {
    Cli::new(EXE)
        .config(cfg)
        .dump_master_key(dev.to_str().unwrap())
        .master_key_hex()
}

#[test]
fn a_header_rewritten_to_another_host_is_refused_before_any_request() {
    let Setup { kv, trap, cfg, .. } = setup(&["disk-kek"]);
    let dev = image(&kv, "disk.img");
    let devs = dev.to_str().unwrap();
    run(&cfg, &["format", devs, "--key-id", &pin("disk-kek")]).ok();
    rewrite_key_ids(
        &dev,
        &format!("https://{VAULT}/keys/"),
        &format!("https://{ATTACKER}/keys/"),
    );
    let forged = kvcrypt_header_io::read(&dev).unwrap().slots[0]
        .key_id
        .clone();
    assert!(
        forged.starts_with(&format!("https://{ATTACKER}/")),
        "{forged}"
    );

    let before = kv.total_requests();
    for args in [
        vec![
            "open",
            devs,
            "t-pin-evil",
            "--transport",
            "fuse",
            "--no-access-checks",
        ],
        vec![
            "header",
            "dump",
            "--dump-master-key",
            "--yes-i-understand",
            devs,
        ],
        vec!["rewrap", devs],
    ] {
        let out = run(&cfg, &args);
        out.code(15);
        let e = &out.stderr;
        assert!(
            e.contains(&forged) && e.contains(&pin("disk-kek")),
            "{args:?}: the error names the header's key id and the pins: {e}"
        );
    }
    assert!(
        !trap.was_contacted(),
        "a request went to the host the disk names"
    );
    assert_eq!(
        kv.total_requests(),
        before,
        "no request at all (not even a token) for a refused header"
    );
    assert!(kvcrypt::worker::read_state("t-pin-evil").is_none());
}

#[test]
fn a_header_naming_another_key_of_the_same_vault_is_refused() {
    // The attacker's volume: a key of the same vault they can use, a master key they know.
    let Setup {
        kv, p, trap, cfg, ..
    } = setup(&["disk-kek", "evil-kek"]);
    let dev = image(&kv, "planted.img");
    let devs = dev.to_str().unwrap();
    let made = run(
        &cfg,
        &[
            "format",
            devs,
            "--key-id",
            &pin("evil-kek"),
            "--allow-unpinned-key",
        ],
    );
    made.ok();
    assert!(
        made.stderr.contains("does not pin"),
        "warned: {}",
        made.stderr
    );

    let before = kv.total_requests();
    let out = Cli::new(EXE).config(&cfg).dump_master_key(devs);
    out.code(15);
    assert!(out.stderr.contains("/keys/evil-kek/"), "{}", out.stderr);
    let out = run(
        &cfg,
        &[
            "open",
            devs,
            "t-pin-planted",
            "--transport",
            "fuse",
            "--no-access-checks",
        ],
    );
    out.code(15);
    assert_eq!(kv.total_requests(), before, "nothing asked of the vault");
    assert!(kvcrypt::worker::read_state("t-pin-planted").is_none());

    // With the evil key pinned as well, the same header unlocks: the pin is what decides.
    let both = config(
        &kv,
        &p,
        &format!(
            "keys = [\"{}\", \"{}\"]",
            pin("disk-kek"),
            // Compared as Key Vault does: host and key name case-insensitively.
            "https://MyVault.Vault.Azure.Net/keys/Evil-KEK"
        ),
        trap.port(),
    );
    master_key(&both, &dev);
}

#[test]
fn a_pinned_versionless_key_still_unlocks_after_rotation() {
    let Setup {
        kv,
        trap,
        cfg,
        first_version: v1,
        ..
    } = setup(&["disk-kek"]);
    let dev = image(&kv, "rot.img");
    let devs = dev.to_str().unwrap();
    run(&cfg, &["format", devs, "--key-id", &pin("disk-kek")]).ok();
    let vmk = master_key(&cfg, &dev);
    let v2 = kv.emu.create_key("disk-kek", "RSA", Some(2048)).unwrap();
    assert_ne!(v1, v2);
    // The rewrap adds a slot for the latest version (pinned through the versionless id) and
    // drops the old one; the new version unlocks.
    run(&cfg, &["rewrap", devs, "--remove-slot", "0"]).ok();
    let l = kvcrypt_header_io::read(&dev).unwrap();
    assert_eq!(l.slots.len(), 1);
    assert!(
        v2.ends_with(l.slots[0].key_id.rsplit('/').next().unwrap()),
        "{v2} vs {}",
        l.slots[0].key_id
    );
    assert_eq!(master_key(&cfg, &dev), vmk);
    assert!(!trap.was_contacted());
}

#[test]
fn format_and_rewrap_write_only_pinned_keys() {
    let Setup {
        kv,
        p,
        trap,
        cfg: pinned,
        ..
    } = setup(&["disk-kek", "other-kek"]);
    let unpinned = config(&kv, &p, "", trap.port());
    let dev = image(&kv, "fmt.img");
    let devs = dev.to_str().unwrap();

    let before = kv.total_requests();
    let out = run(&pinned, &["format", devs, "--key-id", &pin("other-kek")]);
    out.code(15);
    assert!(
        out.stderr.contains(&pin("other-kek")) && out.stderr.contains(&pin("disk-kek")),
        "{}",
        out.stderr
    );
    // Nothing pinned at all: refused too, saying how to pin.
    let out = run(&unpinned, &["format", devs, "--key-id", &pin("disk-kek")]);
    out.code(15);
    assert!(
        out.stderr.contains("keys = [") && out.stderr.contains("--allow-unpinned-key"),
        "{}",
        out.stderr
    );
    assert_eq!(kv.total_requests(), before, "refused before any request");
    assert!(
        matches!(
            kvcrypt_header_io::read(&dev),
            Err(header::HeaderError::NotKvcrypt { .. })
        ),
        "nothing written"
    );

    run(&pinned, &["format", devs, "--key-id", &pin("disk-kek")]).ok();
    let out = run(&pinned, &["rewrap", devs, "--key-id", &pin("other-kek")]);
    out.code(15);
    assert_eq!(
        kvcrypt_header_io::read(&dev).unwrap().slots.len(),
        1,
        "no slot added"
    );
    // Told otherwise: the slot is added, with a warning.
    let out = run(
        &pinned,
        &[
            "rewrap",
            devs,
            "--key-id",
            &pin("other-kek"),
            "--allow-unpinned-key",
        ],
    );
    out.ok();
    assert!(out.stderr.contains("does not pin"), "{}", out.stderr);
    assert_eq!(kvcrypt_header_io::read(&dev).unwrap().slots.len(), 2);
}

#[test]
fn a_bad_pin_is_a_configuration_error_naming_it() {
    let kv = Kv::start();
    let p = kv.principal("host", &[Op::Get, Op::Wrap, Op::Unwrap]);
    let dev = image(&kv, "bad.img");
    for (bad, why) in [
        (format!("{}/0123456789abcdef", pin("disk-kek")), "version"),
        (format!("http://{VAULT}/keys/disk-kek"), "https"),
        (format!("https://{VAULT}/secrets/disk-kek"), "/keys/"),
    ] {
        let cfg = config(&kv, &p, &format!("keys = [\"{bad}\"]"), 9);
        let out = run(
            &cfg,
            &[
                "format",
                dev.to_str().unwrap(),
                "--key-id",
                &pin("disk-kek"),
            ],
        );
        assert_eq!(out.code, Some(7), "{bad}: {}", out.stderr);
        let e = &out.stderr;
        assert!(
            e.contains(&format!("keys entry '{bad}'")) && e.contains(why),
            "{bad}: {e}"
        );
        // The agent's [[volume]] keys: the same, at load.
        let agent_cfg = kv.dir.path().join("agent-bad.toml");
        std::fs::write(
            &agent_cfg,
            format!(
                "{}[[volume]]\nname = \"v\"\npath = \"/dev/null\"\nkeys = [\"{bad}\"]\n",
                std::fs::read_to_string(config(&kv, &p, "", 9)).unwrap()
            ),
        )
        .unwrap();
        let out = Cli::new(EXE)
            .config(&agent_cfg)
            .env("KVCRYPT_RUN_DIR", kv.dir.path().join("run"))
            .run(&["agent", "--once"]);
        assert_eq!(out.code, Some(7), "{bad}: {}", out.stderr);
        assert!(
            out.stderr.contains(&format!("keys entry '{bad}'")),
            "{bad}: {}",
            out.stderr
        );
    }
}

/// Kills the agent on drop, so a failing assertion leaves no daemon behind.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_agent_refuses_a_rewritten_header_without_a_request() {
    use kvcrypt_lab::lab::{Lab, LabOptions, VAULT_HOST};
    if !kvcrypt_testkit::env::is_root() {
        eprintln!("SKIPPED: the agent needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), Path::new(EXE), &LabOptions::default()).unwrap();
    lab.format().unwrap();
    let trap = Trap::new();
    // The attacker's host resolves to the trap, so a request there would be seen.
    let text = std::fs::read_to_string(&lab.config).unwrap().replacen(
        "resolve = [",
        &format!("resolve = [\"{ATTACKER}:443:127.0.0.1:{}\", ", trap.port()),
        1,
    );
    std::fs::write(&lab.config, text).unwrap();
    rewrite_key_ids(
        &lab.image,
        &format!("https://{VAULT_HOST}/keys/"),
        &format!("https://{ATTACKER}/keys/"),
    );
    let before = lab.emu.requests().0.total;
    let _agent = Agent(lab.spawn_agent(None).unwrap());
    let t0 = Instant::now();
    let st = loop {
        if let Ok(st) = lab.status()
            && st.last_error.is_some()
        {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no status");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        st.state,
        kvcrypt::agent::status::VolumeState::Locked,
        "{st:?}"
    );
    let e = st.last_error.unwrap();
    assert_eq!(
        serde_json::to_value(e.class).unwrap(),
        "not-pinned",
        "{}",
        e.message
    );
    assert!(
        e.message.contains(ATTACKER) && e.message.contains(&lab.key_id),
        "{}",
        e.message
    );
    assert!(
        st.reason.unwrap_or_default().contains("key not pinned"),
        "kvcrypt status shows why"
    );
    assert!(
        !trap.was_contacted(),
        "the agent connected to the disk's host"
    );
    assert_eq!(
        lab.emu.requests().0.total,
        before,
        "no request to the vault"
    );
}
