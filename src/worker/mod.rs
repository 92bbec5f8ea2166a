//! Per-volume worker processes: one detached process per served volume holds its key and serves
//! its device, so that it outlives agent restarts.
//!
//! One process per served volume holds the volume's expanded key and serves its device. This
//! keeps volumes independent (a crash takes down one volume), lets ublk suspend by process exit
//! on kernels without `UBLK_F_QUIESCE`, and gives the agent and the CLI one API:
//!
//! - [`spawn_worker`] starts `kvcrypt worker DEVICE NAME …` detached (new session), hands it the
//!   volume key through a pipe on fd 3 (never argv/env), and waits for the ready line (the block
//!   device path) on fd 4.
//! - The worker writes `/run/kvcrypt/volumes/NAME.json` ([`WorkerState`]) and listens on
//!   `/run/kvcrypt/volumes/NAME.sock` (0600, peers must be uid 0 — SO_PEERCRED), JSON lines.
//! - [`WorkerClient`] speaks that protocol: status / suspend / resume(key) / close.

mod backing;
mod client;
pub mod fdpass;
mod manage;
pub mod protocol;
mod run;
mod sys;
mod udev;

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_datapath::transport::TransportKind;
use kvcrypt_datapath::transport::fuse::FuseInit;
use kvcrypt_exit::{Exit, ExitClass};

pub use client::WorkerClient;
pub use manage::{close_and_wait, name_of_block_device};
pub use protocol::{ServeState, WorkerStatus};
pub use run::{OnReady, RunOptions, link_by_name, run_worker, unlink_by_name};
pub use sys::{pid_alive, take_fd};
pub use udev::{UDEV_NAME_TIMEOUT, udev_running, wait_for_link, wait_until_named};

/// Runtime directory: `/run/kvcrypt`, or `$KVCRYPT_RUN_DIR` (tests, like the agent).
pub fn run_dir() -> PathBuf {
    std::env::var_os("KVCRYPT_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/kvcrypt"))
}
/// Directory of state files, control sockets and worker logs (`RUN/volumes`).
pub fn volumes_dir() -> PathBuf {
    run_dir().join("volumes")
}
/// Directory of the FUSE mount points (files), one per volume (`RUN/fuse`).
pub fn fuse_dir() -> PathBuf {
    run_dir().join("fuse")
}
/// Symlinks to served block devices.
pub const BY_KVCRYPT_DIR: &str = "/dev/disk/by-kvcrypt";

/// What to serve and how (the `kvcrypt worker` command line, minus the descriptors).
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub device: PathBuf,
    pub name: String,
    pub transport: TransportKind,
    pub queues: Option<u16>,
    pub queue_depth: u16,
    pub allow_discards: bool,
    pub read_only: bool,
    /// ublk: re-attach this existing device instead of adding one.
    pub recover_dev_id: Option<u32>,
    /// FUSE: take over a dead worker's connection instead of mounting a new one.
    pub fuse_takeover: Option<FuseTakeover>,
    /// The kvcrypt binary to run (default: the current executable).
    pub exe: Option<PathBuf>,
    /// How long to wait for the ready line.
    pub ready_timeout: Duration,
}

impl WorkerSpec {
    pub fn new(device: impl Into<PathBuf>, name: &str) -> WorkerSpec {
        WorkerSpec {
            device: device.into(),
            name: name.to_string(),
            transport: TransportKind::Auto,
            queues: None,
            queue_depth: 128,
            allow_discards: false,
            read_only: false,
            recover_dev_id: None,
            fuse_takeover: None,
            exe: None,
            ready_timeout: Duration::from_secs(30),
        }
    }

    /// What the worker process serves: this spec without the process-launch settings (used
    /// to serve in the calling process, `kvcrypt open --foreground`).
    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            device: self.device.clone(),
            name: self.name.clone(),
            transport: self.transport,
            queues: self.queues,
            queue_depth: self.queue_depth,
            allow_discards: self.allow_discards,
            read_only: self.read_only,
            recover_dev_id: self.recover_dev_id,
            fuse_takeover: self.fuse_takeover.clone(),
        }
    }
}

/// A FUSE connection whose worker died, for a new worker to serve in place
/// (`transport::fuse::FuseDevice::recover`): the same open /dev/fuse files the dead worker
/// read (the agent kept duplicates), what INIT agreed, and the loop device on its FUSE file.
#[derive(Debug, Clone)]
pub struct FuseTakeover {
    pub loop_dev: PathBuf,
    pub init: FuseInit,
    pub fds: Vec<Arc<OwnedFd>>,
}

/// Where the descriptors of a [`FuseTakeover`] start in the worker (after the key fd 3 and
/// the ready fd 4): `kvcrypt worker --fuse-fds N` takes N of them from here on.
pub const FUSE_FD_BASE: i32 = 5;

/// A started worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub name: String,
    pub pid: u32,
    /// `/dev/loopN` or `/dev/ublkbN`.
    pub block_device: PathBuf,
}

/// Contents of `/run/kvcrypt/volumes/NAME.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerState {
    pub pid: u32,
    pub name: String,
    pub device: PathBuf,
    pub transport: String,
    pub block_device: PathBuf,
    pub ublk_dev_id: Option<u32>,
    pub uuid: String,
    pub read_only: bool,
    pub allow_discards: bool,
    /// FUSE transport only: "io_uring" or "dev_fuse" (how requests reach the worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse_mode: Option<String>,
    /// FUSE transport only: what INIT agreed on the connection. Left behind with the state
    /// file when the worker dies, so a new worker can take the connection over (the kernel
    /// does not send INIT again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse: Option<FuseInit>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(
        "invalid volume name '{0}': use 1-64 characters from [A-Za-z0-9._-], not starting with '.' or '-'"
    )]
    BadName(String),
    #[error("volume '{name}' is already open (worker pid {pid}, {block_device})")]
    AlreadyOpen {
        name: String,
        pid: u32,
        block_device: String,
    },
    #[error("{device} is already served as volume '{name}'")]
    DeviceInUse { device: String, name: String },
    #[error("cannot start the worker for '{name}': {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("the worker for '{name}' failed before it was ready ({status}):\n{log}")]
    Died {
        name: String,
        status: String,
        log: String,
    },
    #[error("the worker for '{name}' was not ready within {secs} s (stopped it); its log:\n{log}")]
    Timeout {
        name: String,
        secs: u64,
        log: String,
    },
    #[error("no volume named '{0}' is open (no control socket in the run directory)")]
    NotOpen(String),
    #[error("control socket of '{name}': {source}")]
    Control {
        name: String,
        source: std::io::Error,
    },
    #[error("permission denied: the control socket of '{0}' is for root only")]
    Permission(String),
    #[error("volume '{name}': {message}")]
    Refused {
        name: String,
        message: String,
        busy: bool,
    },
    #[error("{0}")]
    State(String),
}

impl ExitClass for WorkerError {
    fn exit_class(&self) -> Exit {
        match self {
            WorkerError::BadName(_) => Exit::Usage,
            WorkerError::AlreadyOpen { .. } | WorkerError::DeviceInUse { .. } => Exit::Busy,
            WorkerError::Refused { busy: true, .. } => Exit::Busy,
            WorkerError::NotOpen(_) => Exit::NotFound,
            WorkerError::Permission(_) => Exit::Permission,
            _ => Exit::Failure,
        }
    }
}

/// Volume names become file names, device symlinks and a `kvcrypt worker` argument (so no
/// leading '-'): keep them boring.
pub fn validate_name(name: &str) -> Result<(), WorkerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(WorkerError::BadName(name.to_string()))
    }
}

pub fn state_path(name: &str) -> PathBuf {
    volumes_dir().join(format!("{name}.json"))
}
pub fn socket_path(name: &str) -> PathBuf {
    volumes_dir().join(format!("{name}.sock"))
}
/// Present while the operator keeps `name` locked or closed (`kvcrypt lock` / `close`, until
/// `kvcrypt unlock`); read by a restarted agent. In /run: a reboot forgets it.
pub fn manual_lock_path(name: &str) -> PathBuf {
    volumes_dir().join(format!("{name}.locked"))
}
pub fn log_path(name: &str) -> PathBuf {
    volumes_dir().join(format!("{name}.log"))
}

/// Reads the state file of `name` (None if absent or unreadable).
pub fn read_state(name: &str) -> Option<WorkerState> {
    let text = std::fs::read_to_string(state_path(name)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Every state file whose worker is alive.
pub fn list_states() -> Vec<WorkerState> {
    let Ok(dir) = std::fs::read_dir(volumes_dir()) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let name = n.strip_suffix(".json")?;
            read_state(name)
        })
        .filter(|s| sys::pid_alive(s.pid))
        .collect()
}

/// Creates RUN, RUN/volumes and RUN/fuse (0700).
pub fn ensure_dirs() -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in [run_dir(), volumes_dir(), fuse_dir()] {
        std::fs::create_dir_all(&d)?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Removes the state file and socket of `name` if its worker is gone. Returns the live state
/// if the worker still runs.
pub fn reap_stale(name: &str) -> Option<WorkerState> {
    match read_state(name) {
        Some(s) if sys::pid_alive(s.pid) => Some(s),
        _ => {
            let _ = std::fs::remove_file(state_path(name));
            let _ = std::fs::remove_file(socket_path(name));
            None
        }
    }
}

/// Starts a detached worker serving `spec.device` as `spec.name` with `key` and waits until it
/// is ready. The key travels through a pipe (fd 3 of the worker), never argv or environment.
pub fn spawn_worker(spec: &WorkerSpec, key: &VolumeKey) -> Result<WorkerInfo, WorkerError> {
    validate_name(&spec.name)?;
    let spawn_err = |source| WorkerError::Spawn {
        name: spec.name.clone(),
        source,
    };
    ensure_dirs().map_err(spawn_err)?;
    // A worker that takes over a dead one's device (ublk recovery, FUSE takeover) leaves the
    // dead one's state file in place until it writes its own (an atomic rename): while it
    // exists, udev keeps naming the device (`kvcrypt udev-name`). Removing it first opened a
    // window in which udev dropped /dev/disk/by-kvcrypt/NAME and systemd unmounted the
    // filesystem bound to it (seen in the system test).
    let takeover = spec.recover_dev_id.is_some() || spec.fuse_takeover.is_some();
    let live = if takeover {
        read_state(&spec.name).filter(|s| sys::pid_alive(s.pid))
    } else {
        reap_stale(&spec.name)
    };
    if let Some(s) = live {
        return Err(WorkerError::AlreadyOpen {
            name: s.name,
            pid: s.pid,
            block_device: s.block_device.display().to_string(),
        });
    }
    let canon = std::fs::canonicalize(&spec.device).unwrap_or_else(|_| spec.device.clone());
    if let Some(s) = list_states()
        .into_iter()
        .find(|s| std::fs::canonicalize(&s.device).unwrap_or_else(|_| s.device.clone()) == canon)
    {
        return Err(WorkerError::DeviceInUse {
            device: spec.device.display().to_string(),
            name: s.name,
        });
    }
    let exe = match &spec.exe {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(spawn_err)?,
    };
    let (key_r, key_w) = sys::pipe_high().map_err(spawn_err)?;
    let (ready_r, ready_w) = sys::pipe_high().map_err(spawn_err)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(log_path(&spec.name))
        .map_err(spawn_err)?;

    let mut cmd = Command::new(&exe);
    cmd.arg("worker").arg(&spec.device).arg(&spec.name);
    cmd.args(["--transport", spec.transport.as_str()]);
    cmd.args(["--queue-depth", &spec.queue_depth.to_string()]);
    cmd.args(["--key-fd", "3", "--ready-fd", "4"]);
    if let Some(q) = spec.queues {
        cmd.args(["--queues", &q.to_string()]);
    }
    if spec.allow_discards {
        cmd.arg("--allow-discards");
    }
    if spec.read_only {
        cmd.arg("--read-only");
    }
    if let Some(id) = spec.recover_dev_id {
        cmd.args(["--recover-dev-id", &id.to_string()]);
    }
    // The taken-over /dev/fuse descriptors go to FUSE_FD_BASE.. in the child. Their numbers
    // here are first moved above that range, so no dup2 of the child setup overwrites a source
    // it has yet to copy.
    let mut fuse_high = Vec::new();
    if let Some(t) = &spec.fuse_takeover {
        let min = FUSE_FD_BASE + t.fds.len() as i32;
        for fd in &t.fds {
            fuse_high.push(sys::dup_at_least(fd, min).map_err(spawn_err)?);
        }
        let init = serde_json::to_string(&t.init).unwrap_or_default();
        cmd.arg("--fuse-recover").arg(&t.loop_dev);
        cmd.args(["--fuse-init", &init]);
        cmd.args(["--fuse-fds", &t.fds.len().to_string()]);
    }
    // Nothing of the caller's terminal or pipes may reach the worker: it outlives the caller,
    // and a caller reading `kvcrypt attach`'s output through a pipe would wait for EOF until
    // the worker exits. Its output goes to its log instead.
    let log_out = log.try_clone().map_err(spawn_err)?;
    cmd.stdin(Stdio::null()).stdout(log_out).stderr(log);
    // The service manager's variables describe the agent's unit to its *main* process. The
    // worker is not that process and outlives the agent (KillMode=process), so it must not
    // inherit them: a worker (or anything it links) that sent sd_notify would be refused
    // ("reception only permitted for main PID") or, with NotifyAccess=all, taken for the agent;
    // stale WATCHDOG_*/LISTEN_* would describe a pid and descriptors that are not its own.
    for var in SERVICE_MANAGER_VARS {
        cmd.env_remove(var);
    }
    let mut map = vec![(key_r.as_raw_fd(), 3), (ready_w.as_raw_fd(), 4)];
    for (i, fd) in fuse_high.iter().enumerate() {
        map.push((fd.as_raw_fd(), FUSE_FD_BASE + i as i32));
    }
    // SAFETY: child_setup only performs async-signal-safe calls (setsid, dup2); the map was
    // built before the fork.
    unsafe {
        cmd.pre_exec(move || sys::child_setup(&map));
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    drop(key_r);
    drop(ready_w);
    drop(fuse_high);
    let pid = child.id();

    // Hand over the key. A worker that died early makes this fail with EPIPE; the ready
    // wait below then reports its log.
    {
        use std::io::Write;
        let mut kw = std::fs::File::from(key_w);
        let _ = kw.write_all(key.expose());
    }

    let mut ready = std::fs::File::from(ready_r);
    let deadline = Instant::now() + spec.ready_timeout;
    let mut line = Vec::new();
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sys::poll_readable(&ready, left) {
            Ok(false) => break Err(None),
            Err(e) => break Err(Some(e.to_string())),
            Ok(true) => {}
        }
        let mut buf = [0u8; 256];
        match ready.read(&mut buf) {
            Ok(0) => break Err(Some(String::new())),
            Ok(n) => {
                line.extend_from_slice(&buf[..n]);
                if line.contains(&b'\n') {
                    break Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(Some(e.to_string())),
        }
    };
    match outcome {
        Ok(()) => {
            // Reap the worker when it eventually exits (we are its parent until we exit).
            std::thread::spawn(move || child.wait());
            let text = String::from_utf8_lossy(&line);
            let dev = text.lines().next().unwrap_or("").trim().to_string();
            Ok(WorkerInfo {
                name: spec.name.clone(),
                pid,
                block_device: PathBuf::from(dev),
            })
        }
        Err(None) => {
            let _ = sys::signal(pid, libc::SIGKILL);
            let _ = child.wait();
            Err(WorkerError::Timeout {
                name: spec.name.clone(),
                secs: spec.ready_timeout.as_secs(),
                log: log_tail(&spec.name),
            })
        }
        Err(Some(_)) => {
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            Err(WorkerError::Died {
                name: spec.name.clone(),
                status,
                log: log_tail(&spec.name),
            })
        }
    }
}

/// Environment that systemd sets for a unit's main process only (sd_notify(3),
/// sd_watchdog_enabled(3), sd_listen_fds(3)); never passed on to a child: workers, hooks and
/// `udevadm` (seen in the system test: systemd refused a notification from the agent's
/// `udevadm trigger` child, "reception only permitted for main PID").
pub const SERVICE_MANAGER_VARS: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// The last lines of a worker's log (its stderr), for error messages.
pub fn log_tail(name: &str) -> String {
    let text = std::fs::read_to_string(log_path(name)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(20);
    let tail = lines[start..].join("\n");
    if tail.trim().is_empty() {
        "(the worker wrote nothing)".to_string()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::validate_name;

    #[test]
    fn names_must_be_safe_as_file_names_and_arguments() {
        for ok in ["demo", "data-1", "a.b_c", "x"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(65);
        for bad in ["", ".hidden", "-rf", "../x", "a/b", "sp ace", long.as_str()] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
