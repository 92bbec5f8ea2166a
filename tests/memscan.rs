//! The volume master key (VMK) is never in readable memory: it may live only in the
//! `memfd_secret` pages of the processes that serve I/O, which `/proc/PID/mem` cannot read.
//!
//! Runs the real `kvcrypt agent` on a FUSE volume against the in-process Key Vault emulator
//! (check interval 1 s), learns the VMK with `kvcrypt header dump --dump-master-key` (another
//! process), and scans every readable mapping of the agent, its workers and anything else the
//! agent started, after: start; `kvcrypt lock` + `kvcrypt unlock`; a revocation (suspended);
//! the restore; 20 access checks. Then the same for `kvcrypt open --foreground` without an
//! agent. Looked for: the raw key, hex (both cases), base64 and base64url (with and without
//! padding) and every 32-byte window of the raw key (tests/memscan/scan.rs). The table of
//! copies found is printed in every run; any copy fails the test. With `KVCRYPT_MEMSCAN_DEBUG=1`
//! each copy's address is printed too, with the range of each process's `[stack]` (how deep in
//! the stack a copy lies tells which code left it).
//!
//! So that a broken scanner cannot pass, it first scans a helper process (this test binary,
//! started again) holding a random key in ordinary heap in every form, and must find each.
//!
//! Needs root (FUSE, loop devices, reading other processes' memory); skipped loudly without,
//! except under `CI=true`, where that is a failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvcrypt::agent::status::VolumeState;
use kvcrypt_lab::lab::{Lab, LabOptions, Revocation, VOLUME};

#[path = "memscan/report.rs"]
mod report;
#[path = "memscan/scan.rs"]
mod scan;

use kvcrypt_testkit::agent::{Running, T, ready, stop_agent_child, stop_leftover_worker};
use kvcrypt_testkit::data::hex;
use kvcrypt_testkit::env::{in_ci, skip_without_fuse_loop};
use kvcrypt_testkit::shell::must;
use report::{Table, say};
use scan::{Kind, Needles, Report};

/// The `kvcrypt` binary under test.
const EXE: &str = env!("CARGO_BIN_EXE_kvcrypt");

/// This test's name: the scanner self-check runs this binary again with this filter.
const TEST_NAME: &str = "volume_key_is_never_in_readable_memory";
/// Set in the re-run binary: it holds a planted key instead of running the test.
const HOLDER_ENV: &str = "KVCRYPT_MEMSCAN_HOLDER";
const HOLDER_READY: &str = "MEMSCAN-HOLDER-READY";
/// Time for the processes to finish what a phase started (responses freed, buffers reused)
/// before their memory is scanned: the claim is about steady state, not mid-request.
const SETTLE: Duration = Duration::from_secs(2);
/// Access checks to wait for in the last agent phase (check_interval is 1 s in the lab).
const CHECKS: u64 = 20;
/// A process that was scanned must have had at least this much readable memory; less means
/// the scan did not really see it.
const MIN_READ: u64 = 1 << 20;
/// Name of the volume served by `kvcrypt open --foreground`.
const OPEN_NAME: &str = "memscan-open";

#[test]
fn volume_key_is_never_in_readable_memory() {
    if std::env::var_os(HOLDER_ENV).is_some() {
        hold_planted_key();
    }
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    scanner_finds_a_planted_key();

    let mut table = Table::default();
    agent_phases(&mut table);
    open_foreground_phase(&mut table);

    let text = table.render();
    let saved = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("memscan-table.txt");
    let _ = std::fs::write(&saved, &text);
    say(&table.footer());
    say(&format!(
        "\nmemory scan finished in {:.0} s (table also in {})\n",
        t0.elapsed().as_secs_f64(),
        saved.display()
    ));
    let leaks = table.leaks();
    assert!(
        leaks.is_empty(),
        "the volume master key is in readable memory:\n  {}\n{text}",
        leaks.join("\n  ")
    );
}

/// Root, FUSE + loop and a wired build; under CI all of them are required.
fn can_run() -> bool {
    if skip_without_fuse_loop() || !ready(EXE) {
        assert!(
            !in_ci(),
            "CI=true but the memory-scan test cannot run (see above): it needs root, /dev/fuse \
             and /dev/loop-control"
        );
        return false;
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Scanner self-check

/// Scans a helper process that holds a random key in ordinary heap, in every form: each form
/// must be found, else the scanner (or its access to other processes) is broken and a clean
/// table below would mean nothing.
fn scanner_finds_a_planted_key() {
    let mut key = [0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .expect("random key");
    let holder = Holder::spawn(&key);
    let report = scan::scan_process(holder.pid(), &Needles::for_key(&key))
        .unwrap_or_else(|e| panic!("scanning the key-holding helper: {e}"));
    let mut t = Table::default();
    say("\nscanner self-check: a helper process holding a random key in its heap");
    t.add("self-check (planted key)", "helper", report.clone());
    let missed: Vec<&str> = Kind::ALL
        .into_iter()
        .filter(|&k| report.count(k) == 0)
        .map(Kind::label)
        .collect();
    assert!(
        missed.is_empty(),
        "the scanner did not find the key planted in the helper's heap as {missed:?}: \
         a scan that finds nothing proves nothing\n{}",
        t.render()
    );
}

/// The re-run test binary with [`HOLDER_ENV`] set, killed on drop.
struct Holder(Child);

impl Holder {
    fn spawn(key: &[u8]) -> Holder {
        let exe = std::env::current_exe().expect("test binary");
        let mut child = Command::new(exe)
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(HOLDER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the key-holding helper");
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let mut stdin = child.stdin.take().expect("helper stdin");
        writeln!(stdin, "{hex}").expect("send the key to the helper");
        let out = BufReader::new(child.stdout.take().expect("helper stdout"));
        let holder = Holder(child);
        // The harness prints its own lines first; wait for the helper's.
        let ready = out
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains(HOLDER_READY));
        assert!(ready, "the key-holding helper exited before it was ready");
        holder
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// In the helper: keeps the key from stdin (hex) in ordinary heap as raw bytes, hex, HEX, the
/// four base64 forms and a 48-byte fragment (like a leaked read buffer), then waits to be
/// killed.
fn hold_planted_key() -> ! {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("key line");
    let raw = hex(line.trim());
    let hex = line.trim().to_owned();
    let planted: Vec<Vec<u8>> = vec![
        raw.clone(),
        hex.clone().into_bytes(),
        hex.to_ascii_uppercase().into_bytes(),
        STANDARD.encode(&raw).into_bytes(),
        STANDARD_NO_PAD.encode(&raw).into_bytes(),
        URL_SAFE.encode(&raw).into_bytes(),
        URL_SAFE_NO_PAD.encode(&raw).into_bytes(),
        raw[16..].to_vec(),
    ];
    std::hint::black_box(&planted);
    // Straight to stdout: the harness would capture println!.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{HOLDER_READY}");
    let _ = out.flush();
    loop {
        std::thread::park();
    }
}

// ---------------------------------------------------------------------------------------------
// The agent

/// The agent's lab with access restored on drop, so a failure while revoked still lets the
/// agent and worker shut down cleanly (Running's drop then stops them).
struct AgentScenario(Running);

impl Drop for AgentScenario {
    fn drop(&mut self) {
        let _ = self.0.lab.restore(Revocation::Permission);
        let _ = self
            .0
            .lab
            .wait_state(VolumeState::Serving, Duration::from_secs(5));
    }
}

fn agent_phases(table: &mut Table) {
    let s = AgentScenario(Running::start(EXE, LabOptions::default()));
    let r = &s.0;
    let needles = Needles::for_key(&dump_master_key(&r.lab));
    let bd = r.block_device();
    write_through(&bd);
    scan_agent(table, "1 start (serving)", r, &needles);

    cli_ok(&r.lab, &["lock", VOLUME]);
    cli_ok(&r.lab, &["unlock", VOLUME]);
    wait(r, VolumeState::Serving);
    write_through(&bd);
    scan_agent(table, "2 lock + unlock", r, &needles);

    r.lab.revoke(Revocation::Permission).unwrap();
    wait(r, VolumeState::Suspended);
    scan_agent(table, "3 revoked (suspended)", r, &needles);

    r.lab.restore(Revocation::Permission).unwrap();
    wait(r, VolumeState::Serving);
    write_through(&bd);
    scan_agent(table, "4 restored (serving)", r, &needles);

    wait_for_checks(r, CHECKS);
    scan_agent(table, &format!("5 after {CHECKS} checks"), r, &needles);
}

fn wait(r: &Running, state: VolumeState) {
    r.lab.wait_state(state, T).map_err(|e| r.fail(e)).unwrap();
}

/// Waits until the agent made `n` more unwrapKey calls (one per access check; the lab's check
/// interval is 1 s), so the scan after it sees whatever checks leave behind. The volume must
/// still be serving afterwards, so they all succeeded.
fn wait_for_checks(r: &Running, n: u64) {
    let unwraps = || {
        let (counters, _) = r.lab.emu.requests();
        counters.by_op.get("unwrap").copied().unwrap_or(0)
    };
    let before = unwraps();
    let t0 = Instant::now();
    while unwraps() < before + n {
        assert!(
            t0.elapsed() < Duration::from_secs(3 * n + 30),
            "{}",
            r.fail(format!(
                "only {} access checks in {:?}",
                unwraps() - before,
                t0.elapsed()
            ))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(r.lab.status().unwrap().state, VolumeState::Serving);
}

/// Scans the agent, every worker of the lab and every other process below the agent.
fn scan_agent(table: &mut Table, phase: &str, r: &Running, needles: &Needles) {
    std::thread::sleep(SETTLE);
    let agent = r.agent.as_ref().expect("agent running").id();
    let mut procs = vec![(agent, "agent".to_owned())];
    add_workers(&mut procs, &r.lab.run_dir);
    add_descendants(&mut procs, agent);
    scan_all(table, phase, &procs, needles);
}

// ---------------------------------------------------------------------------------------------
// kvcrypt open --foreground

/// `kvcrypt open --foreground` on a volume of its own (its own lab, no agent): scanned while it
/// serves, after a few check intervals.
fn open_foreground_phase(table: &mut Table) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), Path::new(EXE), &LabOptions::default()).unwrap();
    lab.format().unwrap();
    let needles = Needles::for_key(&dump_master_key(&lab));
    let open = ForegroundOpen::spawn(&lab);
    let bd = open.wait_serving();
    write_through(&bd);
    std::thread::sleep(SETTLE * 2);
    let pid = open.child.as_ref().unwrap().id();
    // The foreground process is itself the worker (its state file names its own pid).
    let mut procs = vec![(pid, "open --foreground".to_owned())];
    add_workers(&mut procs, &lab.run_dir);
    add_descendants(&mut procs, pid);
    scan_all(table, "6 open --foreground", &procs, &needles);
}

/// A `kvcrypt open --foreground` process; SIGTERM (then SIGKILL) on drop, and any worker of
/// its run directory stopped.
struct ForegroundOpen {
    child: Option<Child>,
    run_dir: PathBuf,
    log: PathBuf,
}

impl ForegroundOpen {
    fn spawn(lab: &Lab) -> ForegroundOpen {
        let log = lab.dir.join("open.log");
        let child = lab
            .kvcrypt()
            .arg("open")
            .arg(&lab.image)
            .args([
                OPEN_NAME,
                "--transport",
                "fuse",
                "--foreground",
                "--no-access-checks",
            ])
            .env("KVCRYPT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start kvcrypt open --foreground");
        ForegroundOpen {
            child: Some(child),
            run_dir: lab.run_dir.clone(),
            log,
        }
    }

    /// Waits for the worker state the serving process publishes; returns its block device.
    fn wait_serving(&self) -> String {
        let state = self.run_dir.join(format!("volumes/{OPEN_NAME}.json"));
        let t0 = Instant::now();
        loop {
            if let Ok(bytes) = std::fs::read(&state)
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
                && let Some(bd) = v["block_device"].as_str()
                && Path::new(bd).exists()
            {
                return bd.to_owned();
            }
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            assert!(
                t0.elapsed() < T,
                "kvcrypt open --foreground did not serve within {T:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ForegroundOpen {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            stop_agent_child(c);
        }
        stop_leftover_worker(&self.run_dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Shared steps

/// The VMK, from `kvcrypt header dump --dump-master-key` (a separate process, as an operator
/// would get it).
fn dump_master_key(lab: &Lab) -> Vec<u8> {
    let out = cli_ok(
        lab,
        &[
            "header",
            "dump",
            "--json",
            "--dump-master-key",
            "--yes-i-understand",
            lab.image.to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out).expect("header dump JSON");
    let key = hex(v["master_key_hex"].as_str().expect("master_key_hex"));
    assert_eq!(key.len(), 64, "a 512-bit VMK");
    key
}

/// Runs `kvcrypt ARGS` with the lab's config and run directory; panics unless it succeeds.
fn cli_ok(lab: &Lab, args: &[&str]) -> Vec<u8> {
    let out = lab
        .kvcrypt()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kvcrypt");
    assert!(
        out.status.success(),
        "kvcrypt {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Some real I/O through the device (encrypting writes, O_DIRECT so it reaches the worker).
fn write_through(bd: &str) {
    must(&format!(
        "dd if=/dev/urandom of={bd} bs=1M count=4 oflag=direct conv=fsync status=none"
    ));
}

/// Adds the live workers of a run directory (from their state files) not listed yet.
fn add_workers(procs: &mut Vec<(u32, String)>, run_dir: &Path) {
    for (pid, label) in workers(run_dir) {
        if !procs.iter().any(|(p, _)| *p == pid) {
            procs.push((pid, label));
        }
    }
}

/// The live workers of a run directory: (pid, "worker NAME").
fn workers(run_dir: &Path) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir(run_dir.join("volumes")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            let pid = u32::try_from(v["pid"].as_u64()?).ok()?;
            Path::new(&format!("/proc/{pid}"))
                .exists()
                .then(|| (pid, format!("worker {}", v["name"].as_str().unwrap_or("?"))))
        })
        .collect()
}

/// Adds the processes below `root` not listed yet, named by their command.
fn add_descendants(procs: &mut Vec<(u32, String)>, root: u32) {
    for pid in scan::with_descendants(root) {
        if !procs.iter().any(|(p, _)| *p == pid) {
            procs.push((pid, format!("child {}", scan::comm(pid))));
        }
    }
}

/// Scans each process and adds its row. The listed ones (agent, workers, `open`) must be
/// readable; a child that exited meanwhile is only noted.
fn scan_all(table: &mut Table, phase: &str, procs: &[(u32, String)], needles: &Needles) {
    for (pid, label) in procs {
        let result = scan::scan_process(*pid, needles);
        let child = label.starts_with("child ");
        if child && !alive(*pid) {
            say(&format!("  ({label} {pid} exited during the scan)\n"));
            continue;
        }
        let rep = result.unwrap_or_else(|e| panic!("{phase}: scanning {label} (pid {pid}): {e}"));
        check_really_read(label, &rep);
        table.add(phase, label, rep);
    }
}

/// A scan that read (almost) nothing did not see the process: fail rather than count it clean.
fn check_really_read(label: &str, rep: &Report) {
    assert!(
        rep.bytes_read >= MIN_READ,
        "only {} bytes of {label} (pid {}) could be read: the scan did not see it",
        rep.bytes_read,
        rep.pid
    );
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}
