//! Rotation following end to end: the real `kvcrypt agent` (FUSE + loop) against the Key Vault
//! emulator. The key's rotation policy comes due on the emulator's clock and the vault makes a
//! new version; the agent adds a verified slot for it to
//! both header copies on its own, keeps serving when the customer disables the old version,
//! prunes the old slot after `rotation_grace`, and the data reads back the same throughout.
//! Needs root (loop devices, FUSE) — CI is root.

use std::path::Path;
use std::time::{Duration, Instant};

use kvcrypt::agent::status::{VolumeState, VolumeStatus};
use kvcrypt_kv_emulator::{Op, RotationPolicy};
use kvcrypt_lab::lab::{KEY_NAME, LabOptions};
use kvcrypt_testkit::agent::{Running, T, ready};
use kvcrypt_testkit::shell::must;

const EXE: &str = env!("CARGO_BIN_EXE_kvcrypt");

fn sha256(path: &str) -> String {
    must(&format!("sha256sum {path}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// The key ids of the slots in the header on disk (the primary copy wins when both are valid).
fn slots_on_disk(image: &Path) -> Vec<String> {
    let h = kvcrypt_header_io::read(image).expect("the header on disk reads");
    assert!(
        h.damaged.is_empty(),
        "a header copy is damaged: {:?}",
        h.damaged
    );
    h.header.slots.iter().map(|s| s.key_id.clone()).collect()
}

/// Polls the agent's status until `done` holds (or fails with the agent's log after `within`).
fn wait_for(r: &Running, within: Duration, what: &str, done: impl Fn(&VolumeStatus) -> bool) {
    let t0 = Instant::now();
    loop {
        let st = r.lab.status().unwrap();
        if done(&st) {
            return;
        }
        assert!(
            t0.elapsed() < within,
            "{}",
            r.fail(format!("{what} not seen within {within:?}: {st:?}"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn version(key_id: &str) -> &str {
    key_id.rsplit('/').next().unwrap()
}

#[test]
fn a_new_key_version_gets_a_verified_slot_the_old_one_can_be_disabled_and_is_pruned() {
    if !ready(EXE) {
        return;
    }
    let mut r = Running::start(
        EXE,
        LabOptions {
            agent: "check_interval = \"1s\"\ncheck_jitter = 0.0\ncheck_timeout = \"3s\"\n\
                rotation_check = \"2s\"\nrotation_grace = \"8s\"\n"
                .into(),
            ..Default::default()
        },
    );
    let bd = r.block_device();
    must(&format!(
        "dd if=/dev/urandom of={bd} bs=1M count=8 oflag=direct status=none"
    ));
    let before = sha256(&bd);
    let image = r.lab.image.clone();
    let old = slots_on_disk(&image);
    assert_eq!(old.len(), 1, "{old:?}");

    // The customer's rotation policy (rotate 7 days after creation, versions expire after 90
    // days) comes due: the emulator's clock is moved 8 days on, and the vault makes the new
    // version itself.
    const DAY: u64 = 86_400;
    r.lab
        .emu
        .set_rotation_policy(
            KEY_NAME,
            RotationPolicy::rotate_after(Duration::from_secs(7 * DAY))
                .expires_after(Duration::from_secs(90 * DAY)),
        )
        .unwrap();
    // Reading the policy is a permission of its own (Key Vault Crypto Officer has it): with it
    // the status can say when Key Vault rotates next.
    r.lab
        .emu
        .grant(&r.lab.principal.client_id, &[Op::GetRotationPolicy], None)
        .unwrap();
    let clock = r.lab.emu.advance_clock(Duration::from_secs(8 * DAY));
    assert_eq!(clock.rotated.len(), 1, "{clock:?}");
    let new_version = clock.rotated[0].version.clone();
    wait_for(
        &r,
        Duration::from_secs(15),
        "a slot for the new version",
        |st| {
            st.slots
                .iter()
                .any(|s| version(&s.key_id) == new_version && s.verified_at.is_some())
                && st.key_id.as_deref().map(version) == Some(new_version.as_str())
        },
    );
    let both = slots_on_disk(&image);
    assert_eq!(both.len(), 2, "{both:?}");
    assert_eq!(version(&both[1]), new_version, "{both:?}");
    assert_eq!(
        both[0], old[0],
        "the old slot stays until rotation_grace: {both:?}"
    );
    let st = r.lab.status().unwrap();
    assert!(st.rotation_next.is_some(), "{st:?}");
    assert!(
        st.keys
            .iter()
            .any(|k| version(&k.current) == new_version && k.enabled),
        "{st:?}"
    );

    // What the operator sees.
    let out = r.lab.kvcrypt().args(["status", "demo"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(&format!(
            "/keys/{KEY_NAME}/{new_version} RSA-OAEP-256 (in use, current version, verified"
        )),
        "{text}"
    );
    assert!(
        text.contains("rotation:    followed; next lookup"),
        "{text}"
    );

    // The customer disables the old version: serving goes on without a denied check.
    r.lab
        .emu
        .set_key_enabled(KEY_NAME, Some(version(&old[0])), false)
        .unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        let st = r.lab.status().unwrap();
        assert_eq!(
            st.state,
            VolumeState::Serving,
            "{}",
            r.fail(format!("{st:?}"))
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(sha256(&bd), before);

    // After rotation_grace (8 s) the old version's slot is pruned from both copies.
    wait_for(&r, Duration::from_secs(30), "the old slot pruned", |st| {
        st.slots.len() == 1
    });
    let left = slots_on_disk(&image);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(version(&left[0]), new_version, "{left:?}");
    let h = kvcrypt_header_io::read(&image).unwrap();
    assert!(h.damaged.is_empty(), "{:?}", h.damaged);

    // Lock and unlock: the key comes back through the new slot only.
    let run = |args: &[&str]| {
        let out = r.lab.kvcrypt().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            r.fail(format!("{args:?}: {out:?}"))
        );
    };
    run(&["lock", "demo"]);
    run(&["unlock", "demo"]);
    r.lab.wait_state(VolumeState::Serving, T).unwrap();
    assert_eq!(sha256(&bd), before);

    let log = std::fs::read_to_string(r.lab.dir.join("agent.log")).unwrap();
    for needle in [
        "volume demo: key rotated: added key slot 1 for",
        "and wrote both header copies",
        "volume demo: removed key slot 0",
    ] {
        assert!(log.contains(needle), "{needle:?} not logged:\n{log}");
    }
    r.stop_agent();
}
