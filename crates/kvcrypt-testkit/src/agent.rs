//! The real `kvcrypt agent` in a lab (emulated vault, scratch volume): readiness checks and
//! guards that stop the agent and its workers, so no test leaves a process or device behind
//! even when an assertion fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvcrypt::agent::status::VolumeState;
use kvcrypt_lab::lab::{Lab, LabOptions, Revocation};

use crate::shell::{must, sh};

/// How long a volume may take to reach a state.
pub const T: Duration = Duration::from_secs(30);

/// Root, and a build whose data path is wired (`exe` is the `kvcrypt` binary). While the worker
/// / format wiring are still being merged this says why it cannot run (loudly) instead of
/// failing every scenario on the same missing piece; once they are in, every scenario runs.
pub fn ready(exe: &str) -> bool {
    if !crate::env::is_root() {
        eprintln!("SKIPPED: the agent end-to-end tests need root (loop devices, FUSE, mounts)");
        return false;
    }
    let out = Command::new(exe)
        .args(["worker", "/nonexistent", "probe-only"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if String::from_utf8_lossy(&out.stderr).contains("not implemented yet") {
        eprintln!("SKIPPED: `kvcrypt worker` is not implemented in this build yet");
        return false;
    }
    let out = Command::new(exe)
        .args([
            "--config",
            "/nonexistent/kvcrypt.toml",
            "format",
            "/nonexistent",
            "--key-id",
            "x",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if String::from_utf8_lossy(&out.stderr).contains("not built into this kvcrypt yet") {
        eprintln!(
            "SKIPPED: `kvcrypt format` is not wired to the Key Vault provider in this build yet"
        );
        return false;
    }
    true
}

/// A formatted lab for `exe` in `dir`, no agent yet; the guard stops any worker it leaves.
pub fn formatted_lab(exe: &str, dir: &Path, opts: &LabOptions) -> (Lab, StopWorkerOnDrop) {
    let lab = Lab::start(dir, Path::new(exe), opts).unwrap();
    lab.format().unwrap();
    let stop = StopWorkerOnDrop(lab.run_dir.clone());
    (lab, stop)
}

/// An agent process and the lab it belongs to; stops the agent (SIGTERM, then SIGKILL) and
/// unmounts on drop.
pub struct Running {
    pub lab: Lab,
    pub agent: Option<Child>,
    pub mnt: Option<PathBuf>,
    pub _dir: tempfile::TempDir,
}

impl Running {
    /// A formatted lab for `exe` and its agent, serving.
    pub fn start(exe: &str, opts: LabOptions) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::start(dir.path(), Path::new(exe), &opts).unwrap();
        lab.format().unwrap();
        Running::agent_for(lab, dir)
    }

    /// Starts the agent on a lab already set up (formatted, perhaps altered) and waits until
    /// its volume serves.
    pub fn agent_for(lab: Lab, dir: tempfile::TempDir) -> Running {
        let agent = lab.spawn_agent(None).unwrap();
        let r = Running {
            lab,
            agent: Some(agent),
            mnt: None,
            _dir: dir,
        };
        r.lab
            .wait_state(VolumeState::Serving, T)
            .map_err(|e| r.fail(e))
            .unwrap();
        r
    }

    /// `e` with the agent's log, for a failure message.
    pub fn fail(&self, e: impl std::fmt::Display) -> String {
        let log = std::fs::read_to_string(self.lab.dir.join("agent.log")).unwrap_or_default();
        format!("{e}\n--- agent.log ---\n{log}")
    }

    pub fn block_device(&self) -> String {
        self.lab
            .status()
            .unwrap()
            .block_device
            .expect("served device")
    }

    /// mkfs.ext4 on the served device and mounts it (unmounted on drop).
    pub fn mount(&mut self) -> PathBuf {
        let bd = self.block_device();
        must(&format!("mkfs.ext4 -q -F {bd}"));
        let mnt = self.lab.dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        must(&format!("mount {bd} {}", mnt.display()));
        self.mnt = Some(mnt.clone());
        mnt
    }

    pub fn umount(&mut self) {
        if let Some(m) = self.mnt.take() {
            must(&format!("umount {}", m.display()));
        }
    }

    pub fn stop_agent(&mut self) {
        if let Some(a) = self.agent.take() {
            stop_agent_child(a);
        }
    }
}

/// SIGTERM to an agent we started, SIGKILL if it has not exited after 30 s.
pub fn stop_agent_child(mut a: Child) {
    let _ = kvcrypt_host::process::signal(a.id(), libc::SIGTERM);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if a.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = a.kill();
    let _ = a.wait();
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(m) = self.mnt.take() {
            // The device may be suspended: restore access (and drop injected faults) first so
            // the unmount can finish and the worker can be stopped.
            self.lab.emu.clear_faults();
            for how in [
                Revocation::Permission,
                Revocation::DisableKey,
                Revocation::Firewall,
            ] {
                let _ = self.lab.restore(how);
            }
            let _ = self
                .lab
                .wait_state(VolumeState::Serving, Duration::from_secs(5));
            let _ = sh(&format!(
                "umount {} || umount -l {}",
                m.display(),
                m.display()
            ));
        }
        self.stop_agent();
        stop_leftover_worker(&self.lab.run_dir);
    }
}

/// Workers the agent could not close (slow shutdown under load), or ones a failed scenario
/// left (every volume of the lab, e.g. one added by a reload): stop each by the pid in its
/// state file, so no test leaves a device behind.
pub fn stop_leftover_worker(run_dir: &Path) {
    let Ok(dir) = std::fs::read_dir(run_dir.join("volumes")) else {
        return;
    };
    for e in dir.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            stop_worker_of(&p);
        }
    }
}

/// SIGTERM to the worker whose state file is `state`; waits (bounded) for the file to go.
pub fn stop_worker_of(state: &Path) {
    if let Ok(bytes) = std::fs::read(state)
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
        && let Some(pid) = v["pid"].as_u64()
    {
        let _ = kvcrypt_host::process::signal(pid as u32, libc::SIGTERM);
        for _ in 0..500 {
            if !state.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Stops every worker of the run directory on drop.
pub struct StopWorkerOnDrop(pub PathBuf);

impl Drop for StopWorkerOnDrop {
    fn drop(&mut self) {
        stop_leftover_worker(&self.0);
    }
}

/// For a scenario that runs its agent by hand: stops the agent and any worker it left when the
/// scenario ends early (a failed assertion), so no process or device outlives the test.
pub struct AgentOnDrop<'a> {
    pub child: Option<Child>,
    pub run_dir: &'a Path,
}

impl Drop for AgentOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(a) = self.child.take() {
            stop_agent_child(a);
        }
        stop_leftover_worker(self.run_dir);
    }
}

/// The pid of the lab's `demo` volume worker, from its state file.
pub fn worker_pid(run_dir: &Path) -> u32 {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("volumes/demo.json")).unwrap()).unwrap();
    v["pid"].as_u64().unwrap() as u32
}
