//! End-to-end: the real `kvcrypt agent` against the in-process Key Vault emulator, FUSE + loop
//! transport, check_interval 1 s. Needs root (loop devices, FUSE, mounts) — CI is root.
//!
//! Latencies (revocation → key wiped / I/O held, restore → resumed) are printed and appended to
//! `$CARGO_TARGET_TMPDIR/agent-latency.jsonl`; nothing here asserts on timing.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvcrypt::agent::status::VolumeState;
use kvcrypt_kv_emulator::{Fault, FaultKind, FaultTarget};
use kvcrypt_lab::lab::{Lab, LabOptions, Revocation};

use kvcrypt_testkit::agent::{
    AgentOnDrop, Running, StopWorkerOnDrop, T, formatted_lab, ready, worker_pid,
};
use kvcrypt_testkit::shell::{must, sh};

/// The `kvcrypt` binary under test.
const EXE: &str = env!("CARGO_BIN_EXE_kvcrypt");

fn record(scenario: &str, what: &str, d: Duration) {
    eprintln!(
        "MEASURE {scenario}: {what} = {:.0} ms",
        d.as_secs_f64() * 1000.0
    );
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("agent-latency.jsonl");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
    {
        let _ = writeln!(
            f,
            "{{\"scenario\":\"{scenario}\",\"what\":\"{what}\",\"ms\":{:.1}}}",
            d.as_secs_f64() * 1000.0
        );
    }
}

fn formatted_lab_without_agent(dir: &Path) -> (Lab, StopWorkerOnDrop) {
    formatted_lab(EXE, dir, &LabOptions::default())
}

/// A process doing one O_DIRECT read of the device: it must wait while the volume is locked.
fn direct_read(bd: &str) -> Child {
    Command::new("dd")
        .args([
            &format!("if={bd}"),
            "of=/dev/null",
            "bs=4096",
            "count=1",
            "skip=100",
            "iflag=direct",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn sha256(path: &Path) -> String {
    must(&format!("sha256sum {}", path.display()))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn boot_with_vault_unreachable_then_reachable() {
    if !ready(EXE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let opts = LabOptions {
        agent: "check_interval = \"1s\"\ncheck_jitter = 0.0\ncheck_timeout = \"2s\"\n[agent.unlock_retry]\ninitial = \"300ms\"\nmax = \"1s\"\n".into(),
        ..Default::default()
    };
    let lab = Lab::start(dir.path(), Path::new(EXE), &opts).unwrap();
    lab.format().unwrap();
    // Network down at boot: every connection to the vault and Entra ID is reset.
    lab.emu
        .inject_fault(Fault::new(FaultKind::Reset).target(FaultTarget::All));
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(T)).unwrap();
    let mut guard = AgentOnDrop {
        child: Some(lab.spawn_agent(Some(&notify_path)).unwrap()),
        run_dir: &lab.run_dir,
    };
    let mut buf = [0u8; 1024];
    let n = notify.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    // Not served yet; the failure is classified transient, and it keeps retrying.
    let st = lab.status().unwrap();
    assert_eq!(st.state, VolumeState::Locked, "{st:?}");
    assert_eq!(
        st.last_error.as_ref().map(|e| e.class),
        Some(kvcrypt::agent::ports::AccessClass::Transient),
        "{st:?}"
    );
    assert!(st.block_device.is_none());
    // The network comes back: the volume is served without a restart.
    let t0 = Instant::now();
    lab.emu.clear_faults();
    let (st, _) = lab.wait_state(VolumeState::Serving, T).unwrap();
    record("boot", "vault reachable -> serving", t0.elapsed());
    let bd = st.block_device.unwrap();
    assert!(Path::new(&bd).exists(), "{bd}");
    // STATUS= followed the change.
    let mut saw = false;
    while let Ok(n) = notify.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("serving 1/1") {
            saw = true;
            break;
        }
    }
    assert!(saw);
    let mut agent = guard.child.take().unwrap();
    kvcrypt_host::process::signal(agent.id(), libc::SIGTERM).unwrap();
    assert!(agent.wait().unwrap().success());
    assert!(
        !Path::new(&bd).exists()
            || must(&format!("losetup -n -O BACK-FILE {bd} || true"))
                .trim()
                .is_empty()
    );
}

fn revoke_restore_cycle(r: &mut Running, mnt: &Path, how: Revocation, scenario: &str) {
    let bd = r.block_device();
    let t0 = Instant::now();
    r.lab.revoke(how).unwrap();
    let (st, waited) = r
        .lab
        .wait_state(VolumeState::Suspended, T)
        .map_err(|e| r.fail(e))
        .unwrap();
    record(scenario, "revoke -> key wiped (suspended)", waited);
    assert_eq!(
        st.last_error.as_ref().map(|e| e.class),
        Some(kvcrypt::agent::ports::AccessClass::Denied),
        "{st:?}"
    );
    // The worker reports its key gone.
    if let Some(w) = &st.worker {
        assert!(
            w.get("suspended") == Some(&serde_json::Value::Bool(true))
                || w.get("state").and_then(|s| s.as_str()) == Some("suspended"),
            "worker status while locked: {w}"
        );
    }
    // I/O is held, not failed.
    let mut reader = direct_read(&bd);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        reader.try_wait().unwrap().is_none(),
        "I/O must wait while locked"
    );
    let _ = t0;
    let t1 = Instant::now();
    r.lab.restore(how).unwrap();
    r.lab
        .wait_state(VolumeState::Serving, T)
        .map_err(|e| r.fail(e))
        .unwrap();
    record(scenario, "restore -> resumed (serving)", t1.elapsed());
    let st = reader.wait().unwrap();
    assert!(st.success(), "held read must complete after resume");
    // Same device, resumed in place.
    assert_eq!(r.block_device(), bd);
    // The filesystem is thawed: writes go through.
    must(&format!(
        "echo after-{scenario} > {}/after-{scenario}; sync",
        mnt.display()
    ));
}

#[test]
fn revoke_each_way_locks_and_restore_resumes_without_loss() {
    if !ready(EXE) {
        return;
    }
    let mut r = Running::start(EXE, LabOptions {
        agent:
            "check_interval = \"1s\"\ncheck_jitter = 0.0\ncheck_timeout = \"3s\"\nhold = \"5m\"\n"
                .into(),
        ..Default::default()
    });
    let mnt = r.mount();
    must(&format!(
        "head -c 8388608 /dev/urandom > {m}/data.bin && cp {m}/data.bin {m}/copy.bin && sync",
        m = mnt.display()
    ));
    let sum = sha256(&mnt.join("data.bin"));
    for (how, name) in [
        (Revocation::Permission, "permission"),
        (Revocation::DisableKey, "disable-key"),
        (Revocation::Firewall, "firewall"),
        (Revocation::DeleteIdentity, "delete-identity"),
        (Revocation::DeleteKey, "delete-key"),
    ] {
        revoke_restore_cycle(&mut r, &mnt, how, name);
        assert_eq!(sha256(&mnt.join("data.bin")), sum, "after {name}");
    }
    // Drop caches so the check reads the device, not the page cache.
    must("sync; echo 3 > /proc/sys/vm/drop_caches");
    assert_eq!(sha256(&mnt.join("data.bin")), sum);
    assert_eq!(sha256(&mnt.join("copy.bin")), sum);
    let bd = r.block_device();
    r.umount();
    must(&format!("e2fsck -fn {bd}"));
}

#[test]
fn fio_verify_across_revoke_and_restore() {
    if !ready(EXE) {
        return;
    }
    let r = Running::start(EXE, LabOptions::default());
    let bd = r.block_device();
    let fio = Command::new("fio")
        .args([
            "--name=kv",
            &format!("--filename={bd}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=24M",
            "--ioengine=psync",
            "--direct=1",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--time_based=0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    r.lab.revoke(Revocation::Permission).unwrap();
    let (_, w) = r.lab.wait_state(VolumeState::Suspended, T).unwrap();
    record("fio", "revoke -> key wiped (suspended)", w);
    std::thread::sleep(Duration::from_secs(2));
    let t1 = Instant::now();
    r.lab.restore(Revocation::Permission).unwrap();
    r.lab.wait_state(VolumeState::Serving, T).unwrap();
    record("fio", "restore -> resumed (serving)", t1.elapsed());
    let out = fio.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fio failed:\n{text}");
    assert!(!text.contains("verify: bad"), "{text}");
    assert!(text.contains("err= 0"), "{text}");
}

#[test]
fn hold_expiry_runs_hook_removes_and_restore_reattaches() {
    if !ready(EXE) {
        return;
    }
    let hookdir = tempfile::tempdir().unwrap();
    let hook_out = hookdir.path().join("hook.out");
    let r = Running::start(
        EXE,
        LabOptions {
            agent: format!(
                "check_interval = \"1s\"\ncheck_jitter = 0.0\ncheck_timeout = \"3s\"\nhold = \"3s\"\nhook = \"echo $KVCRYPT_NAME $KVCRYPT_DEVICE >> {}\"\n",
                hook_out.display()
            ),
            ..Default::default()
        },
    );
    let bd = r.block_device();
    // Raw data written through the device (no filesystem: the device goes away).
    must(&format!(
        "head -c 4194304 /dev/urandom > {d}/pattern && dd if={d}/pattern of={bd} bs=1M oflag=direct conv=fsync status=none",
        d = r.lab.dir.display()
    ));
    let want = sha256(&r.lab.dir.join("pattern"));
    r.lab.revoke(Revocation::DisableKey).unwrap();
    r.lab.wait_state(VolumeState::Suspended, T).unwrap();
    let (st, _) = r
        .lab
        .wait_state(VolumeState::Removed, T)
        .map_err(|e| r.fail(e))
        .unwrap();
    assert!(st.block_device.is_none());
    let hook = std::fs::read_to_string(&hook_out).expect("hook ran");
    assert_eq!(hook.trim(), format!("demo {bd}"));
    assert!(
        !Path::new(&bd).exists()
            || must(&format!("losetup -n -O BACK-FILE {bd} || true"))
                .trim()
                .is_empty(),
        "device removed"
    );
    let t1 = Instant::now();
    r.lab.restore(Revocation::DisableKey).unwrap();
    let (st, _) = r
        .lab
        .wait_state(VolumeState::Serving, T)
        .map_err(|e| r.fail(e))
        .unwrap();
    record(
        "hold-expiry",
        "restore -> re-attached (serving)",
        t1.elapsed(),
    );
    let bd2 = st.block_device.unwrap();
    let got = must(&format!(
        "dd if={bd2} bs=1M count=4 iflag=direct status=none | sha256sum"
    ));
    assert_eq!(got.split_whitespace().next().unwrap(), want);
}

#[test]
fn transient_outage_never_locks_and_offline_lock_after_does() {
    if !ready(EXE) {
        return;
    }
    let r = Running::start(EXE, LabOptions::default());
    // 5xx, throttling and hangs for several intervals: stays served.
    for kind in [
        FaultKind::Status { status: 503 },
        FaultKind::Throttle { retry_after: None },
        FaultKind::Hang,
    ] {
        r.lab
            .emu
            .inject_fault(Fault::new(kind).target(FaultTarget::All));
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(4) {
            let st = r.lab.status().unwrap();
            assert_eq!(st.state, VolumeState::Serving, "{st:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        r.lab.emu.clear_faults();
    }
    let st = r.lab.status().unwrap();
    assert_eq!(
        st.last_error.map(|e| e.class),
        Some(kvcrypt::agent::ports::AccessClass::Transient)
    );
    drop(r);

    let r = Running::start(EXE, LabOptions {
        agent: "check_interval = \"1s\"\ncheck_jitter = 0.0\ncheck_timeout = \"2s\"\noffline_lock_after = \"4s\"\n".into(),
        ..Default::default()
    });
    let t0 = Instant::now();
    r.lab
        .emu
        .inject_fault(Fault::new(FaultKind::Status { status: 503 }).target(FaultTarget::All));
    let (st, _) = r.lab.wait_state(VolumeState::Suspended, T).unwrap();
    record(
        "offline",
        "outage -> locked (offline_lock_after 4s)",
        t0.elapsed(),
    );
    assert!(st.reason.unwrap_or_default().contains("offline_lock_after"));
    r.lab.emu.clear_faults();
    r.lab.wait_state(VolumeState::Serving, T).unwrap();
}

#[test]
fn lock_unlock_status_through_the_cli_and_agent_restart_adopts_workers() {
    if !ready(EXE) {
        return;
    }
    let mut r = Running::start(EXE, LabOptions::default());
    let mnt = r.mount();
    must(&format!("echo hello > {}/f; sync", mnt.display()));
    let bd = r.block_device();
    let run = |args: &[&str]| r.lab.kvcrypt().args(args).output().unwrap();

    let t0 = Instant::now();
    let out = run(&["lock", "demo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    record("cli", "kvcrypt lock -> returned (suspended)", t0.elapsed());
    let out = run(&["status", "demo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("demo: suspended (locked by kvcrypt lock)"),
        "{text}"
    );
    // A manual lock is not undone by the periodic check.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(r.lab.status().unwrap().state, VolumeState::Suspended);
    let out = run(&["unlock", "demo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["state"], "serving");
    assert_eq!(v[0]["block_device"], bd.as_str());
    assert!(
        v[0]["worker"].is_object(),
        "I/O counters from the worker: {v}"
    );
    assert!(v[0]["key_id"].as_str().unwrap().contains("/keys/disk-kek/"));

    // Non-root callers are refused.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", EXE])
        .env("KVCRYPT_RUN_DIR", &r.lab.run_dir)
        .args(["status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(12), "{out:?}");

    // Agent RSS while serving.
    let pid = r.agent.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    if let Some(l) = status.lines().find(|l| l.starts_with("VmRSS")) {
        eprintln!("MEASURE agent RSS while serving: {l}");
    }

    // SIGKILL: the worker keeps serving; a new agent adopts it (same device, no new worker).
    let mut a = r.agent.take().unwrap();
    a.kill().unwrap();
    a.wait().unwrap();
    must(&format!("echo during-restart > {}/g; sync", mnt.display()));
    assert_eq!(must(&format!("cat {}/f", mnt.display())).trim(), "hello");
    let t0 = Instant::now();
    r.agent = Some(r.lab.spawn_agent(None).unwrap());
    let (st, _) = r
        .lab
        .wait_state(VolumeState::Serving, T)
        .map_err(|e| r.fail(e))
        .unwrap();
    record(
        "restart",
        "agent restart -> adopted (serving)",
        t0.elapsed(),
    );
    assert_eq!(st.block_device.as_deref(), Some(bd.as_str()));
    assert!(st.reason.unwrap_or_default().contains("adopted"));
    // And it still enforces revocation.
    r.lab.revoke(Revocation::Permission).unwrap();
    r.lab.wait_state(VolumeState::Suspended, T).unwrap();
    r.lab.restore(Revocation::Permission).unwrap();
    r.lab.wait_state(VolumeState::Serving, T).unwrap();
    must("sync; echo 3 > /proc/sys/vm/drop_caches");
    assert_eq!(
        must(&format!("cat {}/g", mnt.display())).trim(),
        "during-restart"
    );
    r.umount();
    must(&format!("e2fsck -fn {bd}"));
}

/// `kvcrypt attach IMAGE` with no agent running, its stdout/stderr captured through pipes
/// (`output()` reads them to EOF); returns the state file of the worker it leaves serving.
fn attach_without_agent(lab: &Lab) -> serde_json::Value {
    let mut cmd = lab.kvcrypt();
    cmd.arg("attach").arg(&lab.image).stdin(Stdio::null());
    // Watchdog only: a hang fails the test instead of blocking the whole run.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(cmd.output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("kvcrypt attach did not return: its worker holds the output pipes")
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(
        &std::fs::read(lab.run_dir.join("volumes/demo.json")).expect("worker state file"),
    )
    .unwrap()
}

#[test]
fn udev_attach_without_agent_then_agent_adopts() {
    if !ready(EXE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (lab, _stop) = formatted_lab_without_agent(dir.path());
    // What kvcrypt-attach@.service runs when udev sees the device and no agent is running:
    // it unlocks the matching configured volume itself and leaves the worker serving.
    let state = attach_without_agent(&lab);
    let bd = state["block_device"].as_str().unwrap().to_owned();
    assert!(Path::new(&bd).exists());
    // The udev naming helper maps the served device back to its volume.
    let kname = bd.trim_start_matches("/dev/");
    let out = lab.kvcrypt().args(["udev-name", kname]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "demo");
    let out = lab.kvcrypt().args(["udev-name", "sda"]).output().unwrap();
    assert!(!out.status.success());
    // A device that matches no volume is left alone.
    let other = dir.path().join("other.img");
    std::fs::write(&other, b"not kvcrypt").unwrap();
    let out = lab.kvcrypt().arg("attach").arg(&other).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no configured volume"));

    // The agent starts later and adopts the worker instead of starting another.
    let mut guard = AgentOnDrop {
        child: Some(lab.spawn_agent(None).unwrap()),
        run_dir: &lab.run_dir,
    };
    let (st, _) = lab.wait_state(VolumeState::Serving, T).unwrap();
    assert_eq!(st.block_device.as_deref(), Some(bd.as_str()));
    assert!(st.reason.unwrap_or_default().contains("adopted"));
    // With the agent running, attach only asks it to retry waiting volumes.
    let out = lab
        .kvcrypt()
        .arg("attach")
        .arg(&lab.image)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("retry now"));
    let mut agent = guard.child.take().unwrap();
    kvcrypt_host::process::signal(agent.id(), libc::SIGTERM).unwrap();
    assert!(agent.wait().unwrap().success());
    assert!(
        !lab.run_dir.join("volumes/demo.json").exists(),
        "closed on shutdown"
    );
}

/// `kvcrypt attach` with no agent leaves a worker running. The worker must not hold attach's
/// stdout/stderr: a caller capturing attach's output through pipes (as here) would otherwise
/// wait for EOF until the worker exits. Its output goes to its log file instead.
#[test]
fn attach_output_through_a_pipe_returns_while_the_worker_keeps_serving() {
    if !ready(EXE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (lab, stop) = formatted_lab_without_agent(dir.path());
    let state = attach_without_agent(&lab);
    let pid = state["pid"].as_u64().unwrap();
    let bd = state["block_device"].as_str().unwrap().to_owned();
    assert!(Path::new(&bd).exists(), "the worker still serves {bd}");
    // Its stdin is /dev/null and its stdout/stderr are its log file.
    let fd = |n: u32| std::fs::read_link(format!("/proc/{pid}/fd/{n}")).unwrap();
    assert_eq!(fd(0), PathBuf::from("/dev/null"));
    let log = lab.run_dir.join("volumes/demo.log");
    assert_eq!(fd(1), log);
    assert_eq!(fd(2), log);

    // Stopped by SIGTERM (a plain `kvcrypt close` may be refused while udev still probes the
    // new device under load); it removes its device and state file.
    drop(stop);
    assert!(!lab.run_dir.join("volumes/demo.json").exists());
}

/// The loop device `bd` is bound to the FUSE file of volume `demo` (by its label: once the
/// worker is dead, sysfs shows its file as "/").
fn bound_to_our_fuse_file(bd: &str) -> bool {
    kvcrypt::agent::reap::loop_label(Path::new(bd))
        .is_ok_and(|l| l.as_deref() == Some("kvcrypt:demo"))
}

/// A string field of volume `demo`'s worker state file.
fn worker_field(run_dir: &Path, field: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("volumes/demo.json")).unwrap()).unwrap();
    v[field].as_str().unwrap_or_default().to_owned()
}

/// The status answer of volume `demo`'s worker, straight from its control socket.
fn worker_status(run_dir: &Path) -> serde_json::Value {
    use std::io::{BufRead, BufReader};
    let mut s = std::os::unix::net::UnixStream::connect(run_dir.join("volumes/demo.sock")).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"{\"op\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// Waits until the agent serves `demo` again after `restarts` worker restarts.
fn wait_restarted(r: &Running, restarts: u32) -> kvcrypt::agent::status::VolumeStatus {
    let t0 = Instant::now();
    loop {
        let st = r.lab.status().map_err(|e| r.fail(e)).unwrap();
        if st.restarts >= restarts && st.state == VolumeState::Serving {
            return st;
        }
        assert!(
            t0.elapsed() < T,
            "{}",
            r.fail(format!("not served again: {st:?}"))
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// fio writing (with verification) a file on the filesystem mounted at `mnt`, for about
/// `secs` seconds; its output goes to `log`.
/// A reader of the device itself, so that requests are in flight at every kill (fio alone
/// pauses between its passes); it stops at the first failed read.
fn device_reader(bd: &str) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while :; do dd if={bd} of=/dev/null bs=1M count=64 iflag=direct status=none || exit 1; done"
        ))
        .spawn()
        .unwrap()
}

fn fio_writer(mnt: &Path, secs: u32, log: &Path) -> Child {
    Command::new("fio")
        .args([
            "--name=w",
            &format!("--filename={}/fio.dat", mnt.display()),
            "--size=48M",
            "--rw=randwrite",
            "--bs=16k",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--loops=1000",
            &format!("--runtime={secs}"),
            "--time_based=0",
            &format!("--output={}", log.display()),
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

/// SIGKILL of a FUSE worker while an ext4 on its loop device is mounted and fio writes to it:
/// the agent holds the worker's FUSE connection (duplicates of its /dev/fuse descriptors), so
/// nothing fails meanwhile; the new worker takes the same /dev/loopN over and the kernel
/// resends what the dead one had read but not answered. Three kills under the same writer:
/// every time the same device, requests really resent, no I/O error, fio's verification
/// passes, e2fsck is clean and a file written before the kills reads back.
#[test]
fn sigkilled_fuse_worker_under_a_mounted_writer_is_recovered_in_place() {
    if !ready(EXE) {
        return;
    }
    let _serial = FUSE_MODE_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = Running::start(
        EXE,
        LabOptions {
            agent: "check_interval = \"5m\"\ncheck_jitter = 0.0\ncheck_timeout = \"3s\"\n".into(),
            size_mib: 256,
            ..Default::default()
        },
    );
    let run_dir = r.lab.run_dir.clone();
    assert_eq!(worker_field(&run_dir, "fuse_mode"), "dev_fuse");
    let bd = r.block_device();
    let mnt = r.mount();
    must(&format!(
        "head -c 8388608 /dev/urandom > {m}/before && sync",
        m = mnt.display()
    ));
    let want = sha256(&mnt.join("before"));
    let fio_log = r.lab.dir.join("fio.log");
    let mut fio = fio_writer(&mnt, 20, &fio_log);
    let mut reader = device_reader(&bd);
    std::thread::sleep(Duration::from_secs(2));
    let mut resent = Vec::new();
    for kill in 1..=3u32 {
        let old_pid = worker_pid(&run_dir);
        let t0 = Instant::now();
        kvcrypt_host::process::signal(old_pid, libc::SIGKILL).unwrap();
        let st = wait_restarted(&r, kill);
        record(
            "worker-crash-fuse-in-place",
            "worker SIGKILL -> serving in place",
            t0.elapsed(),
        );
        assert_eq!(st.restarts, kill, "{st:?}");
        assert_eq!(st.block_device.as_deref(), Some(bd.as_str()), "{st:?}");
        let reason = st.reason.clone().unwrap_or_default();
        assert!(
            reason.contains(&format!("recovered {bd} in place")),
            "{}",
            r.fail(format!("{st:?}"))
        );
        let new_pid = worker_pid(&run_dir);
        assert_ne!(new_pid, old_pid);
        assert!(fio.try_wait().unwrap().is_none(), "fio ended early");
        assert!(reader.try_wait().unwrap().is_none(), "a read failed");
        // Let the new worker serve for a while, then see what it was resent.
        std::thread::sleep(Duration::from_secs(2));
        let ws = worker_status(&run_dir);
        eprintln!("kill {kill}: worker {new_pid} status {ws}");
        resent.push(ws["resent"].as_u64().unwrap_or(0));
    }
    // fio writes through the page cache, so a kill can fall between two writeback bursts with
    // nothing in flight (seen once in CI under a parallel test: 17, 16, 0). At least one of
    // the kills must have caught requests in flight and had them resent; that none was lost
    // is what fio's verify, the sha256 and e2fsck below prove.
    assert!(
        resent.iter().any(|&n| n > 0),
        "no kill had requests in flight that were resent: {resent:?}"
    );
    let status = fio.wait().unwrap();
    assert!(reader.try_wait().unwrap().is_none(), "a read failed");
    let _ = reader.kill();
    let _ = reader.wait();
    let log = std::fs::read_to_string(&fio_log).unwrap_or_default();
    assert!(status.success(), "fio failed: {status}\n{log}");
    assert!(log.contains("err= 0"), "{log}");
    let agent_log = std::fs::read_to_string(r.lab.dir.join("agent.log")).unwrap_or_default();
    assert!(
        agent_log.contains("waits for a new worker to take it over in place"),
        "{agent_log}"
    );
    assert!(
        !agent_log.contains("the FUSE connection died with it"),
        "{agent_log}"
    );
    must("sync; echo 3 > /proc/sys/vm/drop_caches");
    assert_eq!(sha256(&mnt.join("before")), want);
    r.umount();
    must(&format!("e2fsck -fn {bd}"));
    // Closing still ends the connection: the agent lets go of its copies.
    let out = r.lab.kvcrypt().args(["close", "demo"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        r.fail(String::from_utf8_lossy(&out.stderr))
    );
    let t1 = Instant::now();
    while bound_to_our_fuse_file(&bd) {
        assert!(t1.elapsed() < T, "{bd} still bound after close");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A restarted agent (only the agent was killed, no fd store) adopts the live FUSE worker and
/// asks it for its /dev/fuse descriptors again: a later crash of that worker is still
/// recovered in place, on the same /dev/loopN.
#[test]
fn adopted_fuse_worker_killed_later_is_still_recovered_in_place() {
    if !ready(EXE) {
        return;
    }
    let _serial = FUSE_MODE_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = Running::start(
        EXE,
        LabOptions {
            agent: "check_interval = \"5m\"\ncheck_jitter = 0.0\ncheck_timeout = \"3s\"\n".into(),
            ..Default::default()
        },
    );
    let run_dir = r.lab.run_dir.clone();
    let bd = r.block_device();
    let mut a = r.agent.take().unwrap();
    a.kill().unwrap();
    a.wait().unwrap();
    r.agent = Some(r.lab.spawn_agent(None).unwrap());
    let (st, _) = r
        .lab
        .wait_state(VolumeState::Serving, T)
        .map_err(|e| r.fail(e))
        .unwrap();
    assert!(st.reason.unwrap_or_default().contains("adopted"));
    let holder = std::fs::File::open(&bd).unwrap();
    let old_pid = worker_pid(&run_dir);
    kvcrypt_host::process::signal(old_pid, libc::SIGKILL).unwrap();
    let st = wait_restarted(&r, 1);
    assert_eq!(st.block_device.as_deref(), Some(bd.as_str()), "{st:?}");
    assert!(
        st.reason
            .as_deref()
            .unwrap_or_default()
            .contains(&format!("recovered {bd} in place")),
        "{}",
        r.fail(format!("{st:?}"))
    );
    drop(holder);
    device_round_trip(&r.lab.dir, &bd);
}

/// What systemd would keep for the agent's unit: the descriptors of every `FDSTORE=1` message
/// (by `FDNAME=`, minus `FDSTOREREMOVE=1`), read from a notify socket; also the other messages.
#[derive(Default)]
struct FakeFdStore {
    fds: Vec<(String, std::os::fd::OwnedFd)>,
    messages: Vec<String>,
}

impl FakeFdStore {
    /// Reads notifications until `done` holds or the socket's read timeout passes.
    fn read_until(&mut self, sock: &UnixDatagram, done: impl Fn(&FakeFdStore) -> bool) {
        while !done(self) {
            let mut buf = [0u8; 4096];
            let Ok((n, fds)) = kvcrypt::worker::fdpass::recv_with_fds(sock, &mut buf, 253) else {
                return;
            };
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let name = m
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_owned();
            if m.lines().any(|l| l == "FDSTOREREMOVE=1") {
                self.fds.retain(|(n, _)| *n != name);
            } else if m.lines().any(|l| l == "FDSTORE=1") {
                self.fds.extend(fds.into_iter().map(|f| (name.clone(), f)));
            }
            self.messages.push(m);
        }
    }
}

/// Starts the agent as systemd restarts it with a file descriptor store: the stored
/// descriptors become its fds 3.. and `$LISTEN_FDS` / `$LISTEN_FDNAMES` / `$LISTEN_PID` name
/// them (a shell sets the pid to its own, then execs the agent under it).
fn spawn_agent_with_fds(lab: &Lab, fds: &[(String, std::os::fd::OwnedFd)]) -> Child {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let base = lab.kvcrypt();
    let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES={} exec \"$0\" \"$@\"",
            fds.len(),
            names.join(":")
        ))
        .arg(base.get_program())
        .args(base.get_args())
        .arg("agent");
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(lab.dir.join("agent.log"))
        .unwrap();
    c.env("KVCRYPT_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // Sources above the target range, so no dup2 below overwrites one not yet copied.
    let high: Vec<OwnedFd> = fds
        .iter()
        .map(|(_, f)| {
            // SAFETY: F_DUPFD_CLOEXEC duplicates a valid descriptor to a fresh number.
            let n = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 1000) };
            assert!(n >= 0);
            // SAFETY: `n` is a descriptor we just created and own.
            unsafe { OwnedFd::from_raw_fd(n) }
        })
        .collect();
    let map: Vec<i32> = high.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: only dup2 (async-signal-safe) between fork and exec; `map` was built before.
    unsafe {
        c.pre_exec(move || {
            for (i, &src) in map.iter().enumerate() {
                if libc::dup2(src, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = c.spawn().unwrap();
    drop(high);
    child
}

/// Agent and worker SIGKILLed together (`systemctl kill --signal=SIGKILL kvcrypt-agent`): the
/// agent's own copies of the FUSE descriptors die with it, but it had put them into systemd's
/// file descriptor store; the restarted agent gets them back (`$LISTEN_FDS`), finds the dead
/// worker's state file and takes the same /dev/loopN over in place: the mounted ext4 and its
/// writer never see an error. Here the test is systemd: it reads the `FDSTORE=1` messages on
/// the notify socket and hands the descriptors to the new agent.
#[test]
fn agent_and_worker_sigkilled_together_recover_in_place_from_the_fd_store() {
    if !ready(EXE) {
        return;
    }
    let _serial = FUSE_MODE_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(
        dir.path(),
        Path::new(EXE),
        &LabOptions {
            agent: "check_interval = \"5m\"\ncheck_jitter = 0.0\ncheck_timeout = \"3s\"\n".into(),
            size_mib: 256,
            ..Default::default()
        },
    )
    .unwrap();
    lab.format().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let mut guard = AgentOnDrop {
        child: Some(lab.spawn_agent(Some(&notify)).unwrap()),
        run_dir: &lab.run_dir,
    };
    let mut store = FakeFdStore::default();
    store.read_until(&sock, |s| {
        !s.fds.is_empty() && s.messages.iter().any(|m| m.contains("READY=1"))
    });
    let (st, _) = lab.wait_state(VolumeState::Serving, T).unwrap();
    let bd = st.block_device.clone().unwrap();
    let run_dir = lab.run_dir.clone();
    let conn_name = store.fds[0].0.clone();
    assert!(conn_name.starts_with("fuse-"), "{conn_name}");
    assert!(conn_name.ends_with("-demo"), "{conn_name}");
    let n_threads = store.fds.len();
    eprintln!("fd store: {n_threads} descriptors named {conn_name}");

    must(&format!("mkfs.ext4 -q -F {bd}"));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    must(&format!("mount {bd} {}", mnt.display()));
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = sh(&format!("umount -l {}", self.0.display()));
        }
    }
    let mut umount = Some(Umount(mnt.clone()));
    must(&format!(
        "head -c 8388608 /dev/urandom > {m}/before && sync",
        m = mnt.display()
    ));
    let want = sha256(&mnt.join("before"));
    let fio_log = dir.path().join("fio.log");
    let mut fio = fio_writer(&mnt, 12, &fio_log);
    let mut reader = device_reader(&bd);
    std::thread::sleep(Duration::from_secs(2));

    // Both at once, as systemd's SIGKILL to the whole cgroup.
    let worker = worker_pid(&run_dir);
    let mut agent = guard.child.take().unwrap();
    // SAFETY: kill(2) of the agent we started and of its worker (pid from its state file).
    unsafe {
        libc::kill(agent.id() as i32, libc::SIGKILL);
        libc::kill(worker as i32, libc::SIGKILL);
    }
    agent.wait().unwrap();
    let t0 = Instant::now();
    while Path::new(&format!("/proc/{worker}")).exists() {
        assert!(t0.elapsed() < T);
        std::thread::sleep(Duration::from_millis(10));
    }
    // Whatever arrived since (nothing should have been removed).
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    store.read_until(&sock, |_| false);
    assert_eq!(store.fds.len(), n_threads, "{:?}", store.messages);
    // systemd's RestartSec: the writer waits meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    assert!(fio.try_wait().unwrap().is_none(), "fio ended early");
    assert!(reader.try_wait().unwrap().is_none(), "a read failed");
    let t1 = Instant::now();
    guard.child = Some(spawn_agent_with_fds(&lab, &store.fds));
    let st = loop {
        let st = lab.status();
        if let Ok(st) = &st
            && st.state == VolumeState::Serving
            && st.restarts >= 1
        {
            break st.clone();
        }
        let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
        assert!(t1.elapsed() < T, "not recovered: {st:?}\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    record(
        "agent-and-worker-killed",
        "agent restart with the fd store -> serving in place",
        t1.elapsed(),
    );
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    assert_eq!(
        st.block_device.as_deref(),
        Some(bd.as_str()),
        "{st:?}\n{log}"
    );
    assert!(
        st.reason
            .as_deref()
            .unwrap_or_default()
            .contains(&format!("recovered {bd} in place")),
        "{st:?}\n{log}"
    );
    assert!(worker_pid(&run_dir) != worker);
    std::thread::sleep(Duration::from_secs(1));
    let ws = worker_status(&run_dir);
    eprintln!("new worker status {ws}");
    assert!(ws["resent"].as_u64().unwrap_or(0) > 0, "{ws}");
    let status = fio.wait().unwrap();
    assert!(reader.try_wait().unwrap().is_none(), "a read failed");
    let _ = reader.kill();
    let _ = reader.wait();
    let flog = std::fs::read_to_string(&fio_log).unwrap_or_default();
    assert!(status.success(), "fio failed: {status}\n{flog}");
    assert!(flog.contains("err= 0"), "{flog}");
    must("sync; echo 3 > /proc/sys/vm/drop_caches");
    assert_eq!(sha256(&mnt.join("before")), want);
    must(&format!("umount {}", mnt.display()));
    std::mem::forget(umount.take());
    must(&format!("e2fsck -fn {bd}"));
}

/// The scenarios that kill FUSE workers run one at a time: the io_uring one switches the
/// global `fuse.enable_uring` parameter, which decides the mode of every FUSE mount meanwhile.
static FUSE_MODE_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// `fuse.enable_uring=Y` until dropped (then the old value again).
struct UringOn(String);

impl UringOn {
    fn on() -> Option<UringOn> {
        let old = std::fs::read_to_string(ENABLE_URING).ok()?;
        std::fs::write(ENABLE_URING, "Y").ok()?;
        Some(UringOn(old.trim().to_owned()))
    }
}

impl Drop for UringOn {
    fn drop(&mut self) {
        let _ = std::fs::write(ENABLE_URING, &self.0);
    }
}

/// A FUSE-over-io_uring worker killed with SIGKILL takes its FUSE connection with it: its
/// rings die with the process and the kernel's FUSE_NOTIFY_RESEND only reaches /dev/fuse
/// requests, so the agent holds no descriptors in that mode and keeps the old way: the loop
/// device fails I/O, the agent notices at once (its check interval here is 5 minutes: only
/// the exit watch can catch it in time), detaches the dead loop device and serves the volume
/// again on a new one; everything fsynced before the kill reads back.
#[test]
fn sigkilled_fuse_worker_is_served_again_with_fsynced_data_intact() {
    if !ready(EXE) {
        return;
    }
    let _serial = FUSE_MODE_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(uring) = UringOn::on() else {
        eprintln!("SKIPPED: this kernel has no FUSE-over-io_uring ({ENABLE_URING} missing)");
        return;
    };
    let r = Running::start(
        EXE,
        LabOptions {
            agent: "check_interval = \"5m\"\ncheck_jitter = 0.0\ncheck_timeout = \"3s\"\n".into(),
            ..Default::default()
        },
    );
    let bd = r.block_device();
    let run_dir = r.lab.run_dir.clone();
    assert_eq!(worker_field(&run_dir, "fuse_mode"), "io_uring");
    drop(uring);
    assert!(bound_to_our_fuse_file(&bd), "{bd}");
    must(&format!(
        "head -c 4194304 /dev/urandom > {d}/pattern && dd if={d}/pattern of={bd} bs=1M oflag=direct conv=fsync status=none",
        d = r.lab.dir.display()
    ));
    let want = sha256(&r.lab.dir.join("pattern"));
    let old_pid = worker_pid(&run_dir);
    // Held open across the kill, as a mounted filesystem would hold it: the dead device cannot
    // be detached at once, so the new worker gets another one.
    let holder = std::fs::File::open(&bd).unwrap();

    let t0 = Instant::now();
    kvcrypt_host::process::signal(old_pid, libc::SIGKILL).unwrap();
    let st = loop {
        let st = r.lab.status().map_err(|e| r.fail(e)).unwrap();
        if st.restarts >= 1 && st.state == VolumeState::Serving {
            break st;
        }
        assert!(
            t0.elapsed() < T,
            "{}",
            r.fail(format!("not served again: {st:?}"))
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    record(
        "worker-crash-fuse",
        "worker SIGKILL -> serving again",
        t0.elapsed(),
    );
    assert_eq!(st.restarts, 1, "{st:?}");
    assert!(
        st.reason
            .as_deref()
            .unwrap_or_default()
            .contains("re-opened"),
        "{st:?}"
    );
    let new_pid = worker_pid(&run_dir);
    assert_ne!(new_pid, old_pid);
    assert!(Path::new(&format!("/proc/{new_pid}")).exists());
    let bd2 = st.block_device.clone().expect("served device");
    assert!(bound_to_our_fuse_file(&bd2), "{bd2}");
    assert_ne!(bd2, bd, "the old device is still held open");
    assert!(bound_to_our_fuse_file(&bd), "held open: still bound");
    // I/O on the old device fails (its FUSE connection died with the worker) …
    let o = sh(&format!(
        "dd if={bd} of=/dev/null bs=4096 count=1 iflag=direct status=none"
    ));
    assert!(!o.status.success(), "read from the dead device succeeded");
    // … and it is detached on its last close, not left bound to the dead FUSE file.
    drop(holder);
    let t1 = Instant::now();
    while bound_to_our_fuse_file(&bd) {
        assert!(
            t1.elapsed() < T,
            "{bd} still bound to the dead worker's file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let agent_log = std::fs::read_to_string(r.lab.dir.join("agent.log")).unwrap_or_default();
    for l in agent_log.lines().filter(|l| l.contains("worker")) {
        eprintln!("agent.log: {l}");
    }
    eprintln!("device before the kill {bd}, after {bd2}");
    assert!(
        agent_log.contains("I/O on") && agent_log.contains("worker restarted"),
        "{agent_log}"
    );
    let got = must(&format!(
        "dd if={bd2} bs=1M count=4 iflag=direct status=none | sha256sum"
    ));
    assert_eq!(got.split_whitespace().next().unwrap(), want);
    // Writes work on the new device too.
    must(&format!(
        "dd if={d}/pattern of={bd2} bs=1M seek=8 oflag=direct conv=fsync status=none",
        d = r.lab.dir.display()
    ));
}

/// Status of volume `name` from the running agent.
fn status_of(lab: &Lab, name: &str) -> anyhow::Result<kvcrypt::agent::status::VolumeStatus> {
    use kvcrypt::agent::control::{self, Request};
    let r = control::request(
        &lab.run_dir.join("control.sock"),
        &Request::Status {
            name: Some(name.into()),
        },
        Duration::from_secs(10),
    )?;
    r.volumes
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("agent returned no volume"))
}

/// Polls until `ok` holds for volume `name`'s status.
fn wait_status(
    r: &Running,
    name: &str,
    what: &str,
    ok: impl Fn(&kvcrypt::agent::status::VolumeStatus) -> bool,
) -> kvcrypt::agent::status::VolumeStatus {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < T {
        match status_of(&r.lab, name) {
            Ok(s) if ok(&s) => return s,
            Ok(s) => last = format!("{s:?}"),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{}",
        r.fail(format!("{name}: not {what} after {T:?}; last: {last}"))
    );
}

fn sighup(r: &Running) {
    let pid = r.agent.as_ref().expect("agent running").id();
    kvcrypt_host::process::signal(pid, libc::SIGHUP).unwrap();
}

/// Reads sd_notify datagrams until one contains `want`; returns every one read.
fn notify_until(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let mut buf = [0u8; 2048];
    let mut seen = Vec::new();
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {want:?} notification ({e}); got {seen:?}"));
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = m.contains(want);
        seen.push(m);
        if done {
            return seen;
        }
    }
}

/// Writes 1 MiB of random data through the plaintext device and reads it back uncached.
fn device_round_trip(dir: &Path, bd: &str) {
    let src = dir.join("pattern.bin");
    must(&format!(
        "head -c 1048576 /dev/urandom > {s} && dd if={s} of={bd} bs=64k oflag=direct conv=fsync status=none",
        s = src.display()
    ));
    let back = dir.join("back.bin");
    must(&format!(
        "dd if={bd} of={b} bs=64k count=16 iflag=direct status=none",
        b = back.display()
    ));
    assert_eq!(
        sha256(&back),
        sha256(&src),
        "{bd} must read back what was written"
    );
}

#[test]
fn reload_adds_volumes_keeps_serving_on_a_bad_file_and_applies_policy() {
    if !ready(EXE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), Path::new(EXE), &LabOptions::default()).unwrap();
    lab.format().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(T)).unwrap();
    let agent = lab.spawn_agent(Some(&notify_path)).unwrap();
    let mut r = Running {
        lab,
        agent: Some(agent),
        mnt: None,
        _dir: dir,
    };
    notify_until(&notify, "READY=1");
    r.lab
        .wait_state(VolumeState::Serving, T)
        .map_err(|e| r.fail(e))
        .unwrap();
    let demo_bd = r.block_device();

    // A second volume, formatted with the same key, added to the file.
    let img = r.lab.dir.join("second.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = r
        .lab
        .kvcrypt()
        .args(["format", img.to_str().unwrap(), "--key-id", &r.lab.key_id])
        .args(["--label", "second", "--yes"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let original = std::fs::read_to_string(&r.lab.config).unwrap();
    let second = format!(
        "\n[[volume]]\nname = \"second\"\npath = \"{}\"\ntransport = \"fuse\"\n",
        img.display()
    );
    std::fs::write(&r.lab.config, format!("{original}{second}")).unwrap();
    sighup(&r);
    let msgs = notify_until(&notify, "READY=1");
    assert!(msgs.iter().any(|m| m.contains("RELOADING=1")), "{msgs:?}");
    let st = wait_status(&r, "second", "serving", |s| s.state == VolumeState::Serving);
    let second_bd = st.block_device.clone().expect("served device");
    device_round_trip(&r.lab.dir, &second_bd);
    // The first volume was not touched.
    assert_eq!(r.block_device(), demo_bd);
    assert_eq!(r.lab.status().unwrap().state, VolumeState::Serving);

    // An invalid file: nothing changes, the agent keeps running and serving both, and says so.
    std::fs::write(
        &r.lab.config,
        format!("{original}{second}")
            .replace("check_interval = \"1s\"", "check_interval = \"soon\""),
    )
    .unwrap();
    sighup(&r);
    let msgs = notify_until(&notify, "READY=1");
    let ready = msgs.last().unwrap();
    assert!(ready.contains("reload FAILED"), "{ready}");
    let log = std::fs::read_to_string(r.lab.dir.join("agent.log")).unwrap();
    assert!(
        log.contains("keeping the previous configuration")
            && log.contains(&format!("reloading {} failed", r.lab.config.display()))
            && log.contains("soon"),
        "{log}"
    );
    assert!(
        r.agent.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the agent must survive a bad reload"
    );
    // An unreadable credential file: the new [vault] provider cannot be built, nothing changes.
    let missing = r.lab.dir.join("no-such-secret");
    std::fs::write(
        &r.lab.config,
        format!("{original}{second}")
            .replace(
                &r.lab.dir.join("client-secret").display().to_string(),
                &missing.display().to_string(),
            )
            .replace("check_interval = \"1s\"", "check_interval = \"9s\""),
    )
    .unwrap();
    sighup(&r);
    let msgs = notify_until(&notify, "READY=1");
    assert!(msgs.last().unwrap().contains("reload FAILED"), "{msgs:?}");
    let log = std::fs::read_to_string(r.lab.dir.join("agent.log")).unwrap();
    assert!(log.contains("no-such-secret"), "{log}");
    assert!(
        r.agent.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the agent must survive a bad reload"
    );
    for name in ["demo", "second"] {
        let s = status_of(&r.lab, name).unwrap();
        assert_eq!(s.state, VolumeState::Serving, "{s:?}");
        assert_eq!(s.policy.as_ref().unwrap().check_interval, "1s");
    }
    device_round_trip(&r.lab.dir, &second_bd);
    // The old provider still works: checks keep succeeding.
    let before = status_of(&r.lab, "demo").unwrap().last_ok.unwrap();
    wait_status(&r, "demo", "checked again", |s| {
        s.last_ok.is_some_and(|t| t > before)
    });

    // New policy (slower checks, remove on revocation) and `second` removed from the file.
    std::fs::write(
        &r.lab.config,
        original.replace(
            "check_interval = \"1s\"",
            "check_interval = \"2s\"\nrevoke_policy = \"remove\"",
        ),
    )
    .unwrap();
    sighup(&r);
    let msgs = notify_until(&notify, "READY=1");
    assert!(!msgs.last().unwrap().contains("FAILED"), "{msgs:?}");
    let st = wait_status(&r, "demo", "on the new policy", |s| {
        s.policy.as_ref().is_some_and(|p| p.check_interval == "2s")
    });
    assert_eq!(
        st.policy.unwrap().revoke_policy,
        kvcrypt::agent::config::RevokePolicy::Remove
    );
    assert_eq!(
        st.block_device.as_deref(),
        Some(demo_bd.as_str()),
        "same worker"
    );
    // Removed from the file: still served (a reload never yanks a device), and shown so.
    let st = status_of(&r.lab, "second").unwrap();
    assert!(st.removed_from_config, "{st:?}");
    assert_eq!(st.state, VolumeState::Serving);
    device_round_trip(&r.lab.dir, &second_bd);
    let text = r.lab.kvcrypt().args(["status", "second"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("REMOVED from the configuration"), "{text}");

    // The policy takes effect: a revocation now removes `demo` at once (no hold) …
    r.lab.revoke(Revocation::Permission).unwrap();
    let st = wait_status(&r, "demo", "removed", |s| s.state == VolumeState::Removed);
    assert!(st.block_device.is_none(), "{st:?}");
    // … and still locks the volume that left the configuration (its old policy: suspend).
    wait_status(&r, "second", "suspended", |s| {
        s.state == VolumeState::Suspended
    });
    r.lab.restore(Revocation::Permission).unwrap();
    wait_status(&r, "demo", "re-attached", |s| {
        s.state == VolumeState::Serving
    });
    wait_status(&r, "second", "resumed", |s| s.state == VolumeState::Serving);

    // Closing the removed volume ends the agent's care for it: not re-opened, forgotten.
    let out = r.lab.kvcrypt().args(["close", "second"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = Instant::now();
    let gone = loop {
        match status_of(&r.lab, "second") {
            Err(e) => break e.to_string(),
            Ok(s) if t0.elapsed() > T => panic!("{}", r.fail(format!("still managed: {s:?}"))),
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert!(gone.contains("no volume named"), "{gone}");
    assert!(!r.lab.run_dir.join("volumes/second.json").exists());
    assert_eq!(r.lab.status().unwrap().state, VolumeState::Serving);
}

/// Issue: a damaged header copy was never reported by the agent or the worker (only `header
/// dump` noticed), so a disk could lose its last good copy unnoticed. The agent rewrites it at
/// unlock, once the winning copy proved authentic, and says so in its log.
#[test]
fn agent_repairs_a_damaged_header_copy_at_unlock() {
    if !ready(EXE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), Path::new(EXE), &LabOptions::default()).unwrap();
    lab.format().unwrap();
    // Bit rot inside the secondary copy's JSON metadata.
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(&lab.image)
            .unwrap(),
        b"rot",
        512 * 1024 + 4096 + 20,
    )
    .unwrap();
    let before = kvcrypt_header_io::read(&lab.image).unwrap();
    assert_eq!(before.damaged.len(), 1, "{:?}", before.damaged);
    let mut r = Running::agent_for(lab, dir);
    let after = kvcrypt_header_io::read(&r.lab.image).unwrap();
    assert!(after.damaged.is_empty(), "{:?}", after.damaged);
    assert!(after.sequence > before.sequence);
    assert_eq!(after.uuid, before.uuid);
    let log = std::fs::read_to_string(r.lab.dir.join("agent.log")).unwrap();
    assert!(
        log.contains("repaired the damaged header copy") && log.contains("secondary header"),
        "{log}"
    );
    r.stop_agent();
}

/// `sha256` that shows the agent's log when the read fails.
fn checked_sha256(r: &Running, path: &Path) -> String {
    let o = sh(&format!("timeout 60 sha256sum {}", path.display()));
    assert!(
        o.status.success(),
        "{}",
        r.fail(format!(
            "sha256sum {}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr)
        ))
    );
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Only Key Vault's own error answers revoke: an HTML 403 from something in front of the vault,
/// an empty 404 and a 401 without the vault's challenge keep the volume serving (they are
/// Transient and follow `offline_lock_after`), while Key Vault's own 403 Forbidden locks it.
#[test]
fn proxy_error_pages_never_lock_but_key_vaults_own_403_does() {
    if !ready(EXE) {
        return;
    }
    let mut r = Running::start(EXE, LabOptions {
        agent: "check_interval = \"1s\"\ncheck_jitter = 0.0\ncheck_timeout = \"3s\"\nhold = \"5m\"\noffline_lock_after = \"20s\"\n".into(),
        ..Default::default()
    });
    let mnt = r.mount();
    must(&format!(
        "head -c 1048576 /dev/urandom > {}/data.bin && sync",
        mnt.display()
    ));
    let sum = checked_sha256(&r, &mnt.join("data.bin"));
    let bd = r.block_device();
    let key = kvcrypt_lab::lab::KEY_NAME;

    // Three phases of 2 s each stay well inside offline_lock_after (20 s), also on a loaded host.
    for (kind, seen) in [
        (
            FaultKind::Html { status: 403 },
            "HTTP 403, content-type text/html",
        ),
        (
            FaultKind::Empty { status: 404 },
            "HTTP 404, no content-type, empty body",
        ),
        (
            FaultKind::UnauthorizedNoChallenge,
            "without a Bearer challenge that persisted",
        ),
    ] {
        r.lab.emu.clear_faults();
        r.lab
            .emu
            .inject_fault(Fault::new(kind.clone()).for_key(key));
        let phase = Instant::now();
        let mut checked = false;
        while phase.elapsed() < Duration::from_secs(2) {
            let st = r.lab.status().map_err(|e| r.fail(e)).unwrap();
            assert_eq!(
                st.state,
                VolumeState::Serving,
                "{kind:?} must not lock: {}",
                r.fail(format!("{st:?}"))
            );
            if let Some(e) = &st.last_error
                && e.message.contains(seen)
            {
                assert_eq!(
                    e.class,
                    kvcrypt::agent::ports::AccessClass::Transient,
                    "{e:?}"
                );
                assert!(
                    e.message
                        .contains("not a Key Vault error answer, treated as transient"),
                    "{e:?}"
                );
                checked = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(checked, "no failed check saw {kind:?}: {}", r.fail(""));
        // The device still serves, without the page cache: reads come from the worker.
        must(&format!(
            "timeout 10 dd if={bd} of=/dev/null bs=1M count=4 iflag=direct status=none"
        ));
    }

    // Still no valid answer: offline_lock_after (20 s since the last good check) locks it, and
    // says so — not as a revocation.
    r.lab.emu.clear_faults();
    r.lab
        .emu
        .inject_fault(Fault::new(FaultKind::Html { status: 403 }).for_key(key));
    let (st, _) = r
        .lab
        .wait_state(VolumeState::Suspended, T)
        .map_err(|e| r.fail(e))
        .unwrap();
    let (Some(ok), Some(at)) = (st.last_ok, st.suspended_at) else {
        panic!("{st:?}");
    };
    assert!(
        at - ok >= 19.0,
        "locked {:.1} s after the last good check, before offline_lock_after: {st:?}",
        at - ok
    );
    assert!(
        st.reason
            .as_deref()
            .unwrap_or_default()
            .contains("offline_lock_after"),
        "{st:?}"
    );
    assert_eq!(
        st.last_error.as_ref().map(|e| e.class),
        Some(kvcrypt::agent::ports::AccessClass::Transient),
        "{st:?}"
    );
    r.lab.emu.clear_faults();
    r.lab
        .wait_state(VolumeState::Serving, T)
        .map_err(|e| r.fail(e))
        .unwrap();

    // Key Vault's own 403 Forbidden (RBAC) is a revocation: locked at the next check.
    let t1 = Instant::now();
    r.lab.revoke(Revocation::Permission).unwrap();
    let (st, _) = r
        .lab
        .wait_state(VolumeState::Suspended, T)
        .map_err(|e| r.fail(e))
        .unwrap();
    assert!(t1.elapsed() < Duration::from_secs(8), "{:?}", t1.elapsed());
    let e = st.last_error.as_ref().expect("last error");
    assert_eq!(
        e.class,
        kvcrypt::agent::ports::AccessClass::Denied,
        "{st:?}"
    );
    assert!(e.message.contains("ForbiddenByRbac"), "{e:?}");
    assert!(
        !st.reason
            .as_deref()
            .unwrap_or_default()
            .contains("offline_lock_after"),
        "{st:?}"
    );
    r.lab.restore(Revocation::Permission).unwrap();
    r.lab
        .wait_state(VolumeState::Serving, T)
        .map_err(|e| r.fail(e))
        .unwrap();
    // Nothing was lost on the way (read from the device, not the page cache).
    must("sync; echo 3 > /proc/sys/vm/drop_caches");
    assert_eq!(checked_sha256(&r, &mnt.join("data.bin")), sum);
    r.umount();
}

/// The FUSE loop device `bd` no longer serves volume `name`: gone, detached, or bound to
/// something else (tests running alongside reuse freed loop devices), told by its
/// `kvcrypt:NAME` label.
fn detached(bd: &str, name: &str) -> bool {
    !kvcrypt::agent::reap::loop_label(Path::new(bd))
        .is_ok_and(|l| l.as_deref() == Some(&format!("kvcrypt:{name}")))
}

/// md5 of the first 4 MiB of `bd`, read past the page cache.
fn device_md5(bd: &str) -> String {
    must(&format!(
        "dd if={bd} bs=1M count=4 iflag=direct 2>/dev/null | md5sum"
    ))
}

/// Issue 10, finding 6: a volume opened with `kvcrypt open` was never access-checked (it stayed
/// readable after its key's unwrap permission was revoked) and `status`/`lock` did not know
/// it. With the agent running, `open` hands it to the agent: listed, locked on revocation and
/// resumed on restore, taken over by a restarted agent, and forgotten for good on `close`.
#[test]
fn open_with_an_agent_running_is_access_checked_adopted_and_closed_for_good() {
    if !ready(EXE) {
        return;
    }
    let mut r = Running::start(EXE, LabOptions::default());
    let img = r.lab.dir.join("rt.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let out = r
        .lab
        .kvcrypt()
        .arg("format")
        .arg(&img)
        .args(["--key-id", &r.lab.key_id, "--yes"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let open = |name: &str, dev: &Path| {
        r.lab
            .kvcrypt()
            .arg("open")
            .arg(dev)
            .args([name, "--transport", "fuse"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = open("rt", &img);
    assert!(
        out.status.success(),
        "{}",
        r.fail(String::from_utf8_lossy(&out.stderr))
    );
    let bd = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(bd.starts_with("/dev/"), "open printed {bd:?}");

    // (a) The agent lists and serves it; its record holds no key and is private.
    let st = status_of(&r.lab, "rt").unwrap();
    assert_eq!(st.state, VolumeState::Serving, "{st:?}");
    assert!(st.opened, "{st:?}");
    assert_eq!(st.block_device.as_deref(), Some(bd.as_str()));
    let rec = r.lab.run_dir.join("opened/rt.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&rec).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = r.lab.kvcrypt().args(["status", "rt"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.starts_with("rt: serving (opened by kvcrypt open"),
        "{text}"
    );
    must(&format!(
        "dd if=/dev/urandom of={bd} bs=1M count=4 oflag=direct status=none"
    ));
    let sum = device_md5(&bd);

    // A configured volume's name and a missing device are refused.
    let out = open("demo", &img);
    assert_eq!(out.status.code(), Some(10), "{out:?}");
    let out = open("rt2", &r.lab.dir.join("missing.img"));
    assert_eq!(out.status.code(), Some(11), "{out:?}");
    assert!(status_of(&r.lab, "rt2").is_err());
    assert!(!r.lab.run_dir.join("opened/rt2.json").exists());

    // Revocation locks it (key wiped, I/O held); restore resumes it with the data intact.
    r.lab.revoke(Revocation::Permission).unwrap();
    let st = wait_status(&r, "rt", "suspended", |s| s.state == VolumeState::Suspended);
    assert_eq!(
        st.last_error.as_ref().map(|e| e.class),
        Some(kvcrypt::agent::ports::AccessClass::Denied),
        "{st:?}"
    );
    let mut reader = direct_read(&bd);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        reader.try_wait().unwrap().is_none(),
        "I/O must wait while rt is locked"
    );
    r.lab.restore(Revocation::Permission).unwrap();
    wait_status(&r, "rt", "resumed", |s| s.state == VolumeState::Serving);
    assert!(reader.wait().unwrap().success());
    assert_eq!(device_md5(&bd), sum);

    // (b) A restarted agent (SIGKILL: the worker keeps serving) takes it over again.
    let mut a = r.agent.take().unwrap();
    a.kill().unwrap();
    a.wait().unwrap();
    r.agent = Some(r.lab.spawn_agent(None).unwrap());
    let st = wait_status(&r, "rt", "adopted", |s| s.state == VolumeState::Serving);
    assert!(st.opened, "{st:?}");
    assert_eq!(st.block_device.as_deref(), Some(bd.as_str()));
    assert!(st.reason.unwrap_or_default().contains("adopted"), "adopted");
    // … and still enforces revocation.
    r.lab.revoke(Revocation::Permission).unwrap();
    wait_status(&r, "rt", "suspended", |s| s.state == VolumeState::Suspended);
    r.lab.restore(Revocation::Permission).unwrap();
    wait_status(&r, "rt", "resumed", |s| s.state == VolumeState::Serving);
    assert_eq!(device_md5(&bd), sum);

    // (c) close: closed in the agent, forgotten, not restarted as a crashed worker.
    let out = r.lab.kvcrypt().args(["close", "rt"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        r.fail(String::from_utf8_lossy(&out.stderr))
    );
    let gone = status_of(&r.lab, "rt").unwrap_err().to_string();
    assert!(gone.contains("no volume named"), "{gone}");
    assert!(!rec.exists(), "record deleted on close");
    assert!(detached(&bd, "rt"), "{bd} still served after close");
    // Longer than two check intervals (1 s). (The loop device itself may be reused by a
    // test running alongside; a worker serving rt again would write its state file.)
    std::thread::sleep(Duration::from_millis(2500));
    assert!(status_of(&r.lab, "rt").is_err());
    assert!(!r.lab.run_dir.join("volumes/rt.json").exists());
    let log = std::fs::read_to_string(r.lab.dir.join("agent.log")).unwrap();
    assert_no_crash(&log, "rt");
    // The configured volume was not disturbed.
    assert_eq!(r.lab.status().unwrap().state, VolumeState::Serving);
}

/// Issue 10, finding 7: `kvcrypt close` of a configured volume is done by the agent and stays
/// done: the device goes away for good (not taken for a crashed worker and served again), the
/// status says closed, and the log has no crash or failed I/O.
#[test]
fn close_of_a_configured_volume_is_not_taken_for_a_crash() {
    if !ready(EXE) {
        return;
    }
    let r = Running::start(EXE, LabOptions::default());
    let bd = r.block_device();
    let out = r.lab.kvcrypt().args(["close", "demo"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        r.fail(String::from_utf8_lossy(&out.stderr))
    );
    assert!(detached(&bd, "demo"), "{bd} still served after close");
    // Longer than two check intervals (1 s).
    std::thread::sleep(Duration::from_millis(2500));
    // Not served again: no worker (it would write its state file), no device in the status.
    // (The loop device itself may be reused by a test running alongside.)
    assert!(
        !r.lab.run_dir.join("volumes/demo.json").exists(),
        "{}",
        r.fail(format!("{bd} served again"))
    );
    let st = r.lab.status().unwrap();
    assert!(st.block_device.is_none(), "{st:?}");
    assert_eq!(st.state, VolumeState::Locked, "{st:?}");
    assert!(
        st.reason
            .unwrap_or_default()
            .contains("closed by kvcrypt close"),
        "status after close"
    );
    assert_eq!(st.restarts, 0);
    let log = std::fs::read_to_string(r.lab.dir.join("agent.log")).unwrap();
    assert_no_crash(&log, "demo");
}

/// The agent log has no worker crash, restart or failed I/O for volume `name`.
fn assert_no_crash(log: &str, name: &str) {
    for l in log
        .lines()
        .filter(|l| l.contains(&format!("volume {name}:")))
    {
        for bad in [
            "worker died",
            "crashed",
            "I/O on",
            "failed",
            "worker restarted",
        ] {
            assert!(
                !l.contains(bad) || l.contains("access check failed"),
                "{bad:?} in {l}"
            );
        }
    }
}

/// Issue 10, finding 6: without an agent, `kvcrypt open` used to serve a volume nobody ever
/// access-checked. Now it refuses (exit 11, NotFound) naming both ways out, before reading
/// the device or the configuration; `--foreground` alone is refused too (usage).
#[test]
fn open_without_an_agent_refuses_unless_told_no_access_checks() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(EXE)
            .args([
                "--config",
                "/nonexistent/kvcrypt.toml",
                "open",
                "/nonexistent/disk",
                "x",
            ])
            .args(args)
            .env("KVCRYPT_RUN_DIR", dir.path())
            .env("KVCRYPT_ALLOW_UNLOCKED_KEY_MEMORY", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(11), "{err}");
    assert!(
        err.contains("no agent running") && err.contains("--no-access-checks"),
        "{err}"
    );
    let out = run(&["--foreground"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--no-access-checks"), "{err}");
    // With the flag it goes on as before (and fails here on the missing device).
    let out = run(&["--no-access-checks"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("no agent running"), "{err}");
    assert!(err.contains("/nonexistent/disk"), "{err}");
}
