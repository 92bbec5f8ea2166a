//! Slot policies end to end: the real `kvcrypt agent` (FUSE + loop) serving a volume whose key
//! is split across keys in three vaults (three host names on the Key Vault emulator). Under
//! `k-of-n` (2 of 3) one revoked key is not a revocation of the volume, two are; under `all`
//! either revoked key locks; restoring resumes in place, and the data reads back the same.
//! Needs root (loop devices, FUSE) — CI is root.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kvcrypt::agent::status::VolumeState;
use kvcrypt_kv_emulator::Op;
use kvcrypt_lab::lab::{LOGIN_HOST, Lab, LabOptions, VAULT_HOST};
use kvcrypt_testkit::agent::{AgentOnDrop, T, ready};
use kvcrypt_testkit::shell::must;

const EXE: &str = env!("CARGO_BIN_EXE_kvcrypt");

/// The vaults (host names) and the key in each.
const VAULTS: [(&str, &str); 3] = [
    ("kvcrypt-a.vault.azure.net", "kek-a"),
    ("kvcrypt-b.vault.azure.net", "kek-b"),
    ("kvcrypt-c.vault.azure.net", "kek-c"),
];

fn sha256(path: &str) -> String {
    must(&format!("sha256sum {path}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A lab whose configuration pins the first `n` keys of [`VAULTS`], each in its own vault,
/// and whose image is formatted with `policy` over them.
fn split_lab(dir: &Path, n: usize, policy: &[&str]) -> Lab {
    split_lab_with(dir, n, policy, LabOptions::default())
}

fn split_lab_with(dir: &Path, n: usize, policy: &[&str], opts: LabOptions) -> Lab {
    let lab = Lab::start(dir, Path::new(EXE), &opts).unwrap();
    let port = lab.emu.port();
    let mut keys = Vec::new();
    let mut resolve = vec![
        format!("\"{VAULT_HOST}:443:127.0.0.1:{port}\""),
        format!("\"{LOGIN_HOST}:443:127.0.0.1:{port}\""),
    ];
    for (host, name) in &VAULTS[..n] {
        lab.emu.create_key(name, "RSA", Some(2048)).unwrap();
        lab.emu
            .grant(
                &lab.principal.client_id,
                &[Op::Get, Op::Wrap, Op::Unwrap],
                None,
            )
            .unwrap();
        keys.push(format!("https://{host}/keys/{name}"));
        resolve.push(format!("\"{host}:443:127.0.0.1:{port}\""));
    }
    let text = std::fs::read_to_string(&lab.config).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("keys = ") {
                format!(
                    "keys = [{}]",
                    keys.iter()
                        .map(|k| format!("\"{k}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else if l.starts_with("resolve = ") {
                format!("resolve = [{}]", resolve.join(", "))
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&lab.config, text + "\n").unwrap();
    let mut cmd = lab.kvcrypt();
    cmd.arg("format").arg(&lab.image);
    for k in &keys {
        cmd.arg("--key-id").arg(k);
    }
    let out = cmd
        .args(policy)
        .args(["--label", "demo", "--yes"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "format {policy:?}: {out:?}");
    lab
}

fn revoke(lab: &Lab, i: usize) {
    lab.emu.set_key_enabled(VAULTS[i].1, None, false).unwrap();
}

fn restore(lab: &Lab, i: usize) {
    lab.emu.set_key_enabled(VAULTS[i].1, None, true).unwrap();
}

/// The volume stays `state` for `d` (checked every 200 ms).
fn stays(lab: &Lab, state: VolumeState, d: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        let st = lab.status().unwrap();
        assert_eq!(st.state, state, "{st:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn two_of_three_survives_one_revoked_vault_locks_on_two_and_resumes() {
    if !ready(EXE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lab = split_lab(dir.path(), 3, &["--policy", "k-of-n", "--threshold", "2"]);
    let agent = AgentOnDrop {
        child: Some(lab.spawn_agent(None).unwrap()),
        run_dir: &lab.run_dir,
    };
    let (st, _) = lab.wait_state(VolumeState::Serving, T).unwrap();
    let bd = st.block_device.unwrap();
    must(&format!(
        "dd if=/dev/urandom of={bd} bs=1M count=8 oflag=direct status=none"
    ));
    let before = sha256(&bd);
    let out = lab.kvcrypt().args(["status", "demo"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for x in 1..=3 {
        assert!(text.contains(&format!("RSA-OAEP-256 (share {x}")), "{text}");
    }
    // Both shares that granted are shown as verified, not only the first.
    let verified = text
        .lines()
        .filter(|l| l.contains("(share") && l.contains("verified "))
        .count();
    assert!(verified >= 2, "{text}");

    revoke(&lab, 0);
    stays(&lab, VolumeState::Serving, Duration::from_secs(4));
    revoke(&lab, 1);
    let (st, _) = lab.wait_state(VolumeState::Suspended, T).unwrap();
    let reason = st.reason.unwrap_or_default();
    assert!(
        reason.contains("1 of the 2 key shares needed were granted"),
        "{reason}"
    );
    restore(&lab, 1);
    lab.wait_state(VolumeState::Serving, T).unwrap();
    assert_eq!(sha256(&bd), before);

    // Every key revoked, then all restored.
    revoke(&lab, 1);
    revoke(&lab, 2);
    lab.wait_state(VolumeState::Suspended, T).unwrap();
    for i in 0..3 {
        restore(&lab, i);
    }
    lab.wait_state(VolumeState::Serving, T).unwrap();
    assert_eq!(sha256(&bd), before);
    drop(agent);
}

#[test]
fn all_locks_when_either_of_two_vaults_revokes() {
    if !ready(EXE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lab = split_lab(dir.path(), 2, &["--policy", "all"]);
    let agent = AgentOnDrop {
        child: Some(lab.spawn_agent(None).unwrap()),
        run_dir: &lab.run_dir,
    };
    let (st, _) = lab.wait_state(VolumeState::Serving, T).unwrap();
    let bd = st.block_device.unwrap();
    must(&format!(
        "dd if=/dev/urandom of={bd} bs=1M count=8 oflag=direct status=none"
    ));
    let before = sha256(&bd);
    for i in 0..2 {
        revoke(&lab, i);
        lab.wait_state(VolumeState::Suspended, T).unwrap();
        restore(&lab, i);
        lab.wait_state(VolumeState::Serving, T).unwrap();
        assert_eq!(sha256(&bd), before, "after revoking and restoring key {i}");
    }
    drop(agent);
}

#[test]
fn any_survives_one_revoked_vault_and_locks_when_both_revoke() {
    if !ready(EXE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lab = split_lab(dir.path(), 2, &["--policy", "any"]);
    let agent = AgentOnDrop {
        child: Some(lab.spawn_agent(None).unwrap()),
        run_dir: &lab.run_dir,
    };
    let (st, _) = lab.wait_state(VolumeState::Serving, T).unwrap();
    let bd = st.block_device.unwrap();
    must(&format!(
        "dd if=/dev/urandom of={bd} bs=1M count=8 oflag=direct status=none"
    ));
    let before = sha256(&bd);
    revoke(&lab, 0);
    stays(&lab, VolumeState::Serving, Duration::from_secs(4));
    revoke(&lab, 1);
    lab.wait_state(VolumeState::Suspended, T).unwrap();
    restore(&lab, 1);
    lab.wait_state(VolumeState::Serving, T).unwrap();
    assert_eq!(sha256(&bd), before);
    drop(agent);
}

/// (key id, share) of every slot in the header on disk.
fn shares_on_disk(image: &Path) -> Vec<(String, Option<u8>)> {
    let h = kvcrypt_header_io::read(image).expect("the header on disk reads");
    assert!(h.damaged.is_empty(), "{:?}", h.damaged);
    h.header
        .slots
        .iter()
        .map(|s| (s.key_id.clone(), s.share))
        .collect()
}

#[test]
fn two_of_three_follows_a_rotation_of_one_key_with_its_share() {
    if !ready(EXE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let opts = LabOptions {
        agent: "check_interval = \"1s\"\ncheck_jitter = 0.0\ncheck_timeout = \"3s\"\n\
                rotation_check = \"2s\"\nrotation_grace = \"8s\"\n"
            .into(),
        ..Default::default()
    };
    let lab = split_lab_with(
        dir.path(),
        3,
        &["--policy", "k-of-n", "--threshold", "2"],
        opts,
    );
    let agent = AgentOnDrop {
        child: Some(lab.spawn_agent(None).unwrap()),
        run_dir: &lab.run_dir,
    };
    let (st, _) = lab.wait_state(VolumeState::Serving, T).unwrap();
    let bd = st.block_device.unwrap();
    must(&format!(
        "dd if=/dev/urandom of={bd} bs=1M count=8 oflag=direct status=none"
    ));
    let before = sha256(&bd);
    let old = shares_on_disk(&lab.image);
    assert_eq!(old.len(), 3, "{old:?}");
    let (old_a, share_a) = old
        .iter()
        .find(|(k, _)| k.contains("/keys/kek-a/"))
        .cloned()
        .unwrap();

    // Key A gets a new version: the agent adds a slot wrapping A's share with it.
    let v2 = lab.emu.create_key(VAULTS[0].1, "RSA", Some(2048)).unwrap();
    let t0 = Instant::now();
    let added = loop {
        let now = shares_on_disk(&lab.image);
        if let Some(s) = now.iter().find(|(k, _)| k.ends_with(&v2)) {
            break s.clone();
        }
        assert!(t0.elapsed() < T, "no slot for {v2}: {now:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(added.1, share_a, "the new version wraps the same share");

    // The old version disabled: two keys (A's new version, B or C) still grant.
    let old_version = old_a.rsplit('/').next().unwrap().to_owned();
    lab.emu
        .set_key_enabled(VAULTS[0].1, Some(&old_version), false)
        .unwrap();
    stays(&lab, VolumeState::Serving, Duration::from_secs(3));
    // With B revoked too, A's new version and C make the threshold.
    revoke(&lab, 1);
    stays(&lab, VolumeState::Serving, Duration::from_secs(3));
    restore(&lab, 1);

    // After rotation_grace the old version's slot is pruned; A's share stays in the new slot.
    let t0 = Instant::now();
    loop {
        let now = shares_on_disk(&lab.image);
        if now.len() == 3 && !now.iter().any(|(k, _)| *k == old_a) {
            assert!(now.contains(&added), "{now:?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "not pruned: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(sha256(&bd), before);
    drop(agent);
}
