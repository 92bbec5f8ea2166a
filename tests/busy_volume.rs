//! Issue 10 (d4): destructive commands never write over a volume that is being served.
//! `kvcrypt format --yes` used to overwrite a file the agent served and a block device
//! `kvcrypt open` served (the backing store was not claimed), and `header restore --yes` wrote
//! any header over a served device. Now every serving process holds a claim on its backing
//! store (crates/kvcrypt-host/src/inuse.rs) and `format` / `header restore` refuse with exit 14, whatever the flags.

use std::path::Path;
use std::process::{Output, Stdio};

use kvcrypt::agent::status::VolumeState;
use kvcrypt_lab::lab::{Lab, LabOptions};
use kvcrypt_testkit::agent::{
    Running, StopWorkerOnDrop, T, ready, stop_leftover_worker, worker_pid,
};
use kvcrypt_testkit::shell::{must, sh};

/// The `kvcrypt` binary under test.
const EXE: &str = env!("CARGO_BIN_EXE_kvcrypt");

/// `kvcrypt ARGS` with the lab's config and run directory, no stdin.
fn kv(lab: &Lab, args: &[&str]) -> Output {
    lab.kvcrypt()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn head(p: &Path) -> Vec<u8> {
    let mut b = vec![0u8; 1 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(p).unwrap(), &mut b, 0).unwrap();
    b
}

#[test]
fn format_and_header_restore_refuse_a_file_the_agent_serves_even_when_locked() {
    if !ready(EXE) {
        return;
    }
    let mut r = Running::start(EXE, LabOptions::default());
    let lab = &r.lab;
    let (img, bak) = (s(&lab.image), lab.dir.join("header.bak"));
    let o = kv(lab, &["header", "backup", img, s(&bak)]);
    assert!(o.status.success(), "{}", text(&o));
    let before = head(&lab.image);
    for extra in [&["--yes"][..], &["--yes", "--wipe"][..]] {
        let o = kv(
            lab,
            &[&["format", img, "--key-id", &lab.key_id], extra].concat(),
        );
        let t = text(&o);
        assert_eq!(o.status.code(), Some(14), "{t}");
        assert!(t.contains("is being served by pid"), "{t}");
    }
    let o = kv(lab, &["header", "restore", "--yes", img, s(&bak)]);
    assert_eq!(o.status.code(), Some(14), "{}", text(&o));
    // Locked (key wiped, worker holding I/O): still served, still refused.
    let o = kv(lab, &["lock", "demo"]);
    assert!(o.status.success(), "{}", text(&o));
    lab.wait_state(VolumeState::Suspended, T).unwrap();
    let o = kv(lab, &["format", img, "--key-id", &lab.key_id, "--yes"]);
    assert_eq!(o.status.code(), Some(14), "{}", text(&o));
    assert!(
        head(&lab.image) == before,
        "a refused command wrote to the header area"
    );
    // Once nothing serves it (unlocked, so closing fails no held I/O, then closed), the
    // same command works.
    let o = kv(lab, &["unlock", "demo"]);
    assert!(o.status.success(), "{}", text(&o));
    lab.wait_state(VolumeState::Serving, T).unwrap();
    let o = kv(lab, &["close", "demo"]);
    assert!(o.status.success(), "{}", text(&o));
    r.stop_agent();
    stop_leftover_worker(&r.lab.run_dir);
    let o = kv(
        &r.lab,
        &["header", "restore", "--yes", s(&r.lab.image), s(&bak)],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn format_refuses_a_block_device_served_by_kvcrypt_open_and_it_cannot_be_mounted() {
    if !ready(EXE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), Path::new(EXE), &LabOptions::default()).unwrap();
    let lo = must(&format!("losetup -f --show {}", lab.image.display()))
        .trim()
        .to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = sh(&format!("losetup -d {}", self.0));
        }
    }
    let _lo = Detach(lo.clone());
    let format = ["format", &lo, "--key-id", &lab.key_id, "--yes"];
    let o = kv(&lab, &format);
    assert!(o.status.success(), "{}", text(&o));
    let o = kv(
        &lab,
        &[
            "open",
            &lo,
            "busyvol",
            "--transport",
            "fuse",
            "--no-access-checks",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let _worker = StopWorkerOnDrop(lab.run_dir.clone());
    let before = head(Path::new(&lo));
    let o = kv(&lab, &format);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(14), "{t}");
    assert!(t.contains("in use"), "{t}");
    // The raw backing device cannot be mounted behind the worker's back either.
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let m = sh(&format!("mount -o ro {lo} {}", mnt.display()));
    assert!(
        !m.status.success(),
        "mounting the served backing device worked"
    );
    assert!(
        head(Path::new(&lo)) == before,
        "a refused format wrote to the device"
    );
    let o = kv(&lab, &["close", "busyvol"]);
    assert!(o.status.success(), "{}", text(&o));
}

/// `kvcrypt format --yes` of the lab's image, which must be refused as in use (exit 14); its
/// output, to tell who holds the volume.
fn format_refused(lab: &Lab) -> String {
    let o = kv(
        lab,
        &["format", s(&lab.image), "--key-id", &lab.key_id, "--yes"],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(14), "{t}");
    t
}

/// A worker that never answers the suspend is killed (issue 10 d7); between that kill and the
/// next worker no process serves the volume, yet the agent will resume it, so the agent claims
/// it itself: format is still refused, naming the agent.
#[test]
fn a_volume_whose_wedged_worker_was_killed_stays_claimed_by_the_agent() {
    if !ready(EXE) {
        return;
    }
    let mut r = Running::start(EXE, LabOptions::default());
    let pid = worker_pid(&r.lab.run_dir);
    let agent_pid = r.agent.as_ref().unwrap().id();
    kvcrypt_host::process::signal(pid, libc::SIGSTOP).unwrap();
    let mut lock = r
        .lab
        .kvcrypt()
        .args(["lock", "demo"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The suspend gets no answer for 35 s, then the worker is killed.
    let (st, _) = r
        .lab
        .wait_state(VolumeState::Suspended, std::time::Duration::from_secs(120))
        .map_err(|e| r.fail(e))
        .unwrap();
    let _ = lock.wait();
    let reason = st.reason.clone().unwrap_or_default();
    assert!(reason.contains("killed (SIGKILL)"), "{st:?}");
    assert!(
        !Path::new(&format!("/proc/{pid}/exe")).exists(),
        "worker {pid} still alive"
    );
    let t = format_refused(&r.lab);
    assert!(t.contains(&format!("pid {agent_pid} (")), "{t}");
    // Unlocked: a new worker serves it and the agent lets go of its stand-in claim.
    let o = kv(&r.lab, &["unlock", "demo"]);
    assert!(o.status.success(), "{}", text(&o));
    r.lab
        .wait_state(VolumeState::Serving, T)
        .map_err(|e| r.fail(e))
        .unwrap();
    let t = format_refused(&r.lab);
    assert!(!t.contains(&format!("pid {agent_pid} (")), "{t}");
    r.stop_agent();
}
