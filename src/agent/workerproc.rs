//! The agent's side of the per-volume worker process contract (CONVENTIONS.md §Serving
//! process model): `kvcrypt worker DEVICE NAME … --key-fd N --ready-fd M`, state file
//! `RUN/volumes/NAME.json`, control socket `RUN/volumes/NAME.sock` (JSON lines; `resume` is
//! followed by the 64 raw key bytes).
//!
//! Spoken directly over the documented process/socket protocol so the agent depends only on
//! that contract; workers must outlive the agent (SIGKILL + restart adopts them).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::cli::TransportKind;
use crate::secmem::VolumeKey;

use super::config::VolumeSettings;
use super::control::run_dir;

/// Directory of the workers' state files and sockets.
pub fn volumes_dir() -> PathBuf {
    run_dir().join("volumes")
}

/// `RUN/volumes/NAME.json`, as far as the agent reads it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct StateFile {
    #[serde(default)]
    pub pid: Option<u32>,
    pub device: PathBuf,
    pub block_device: PathBuf,
    #[serde(default)]
    pub transport: Option<String>,
    #[serde(default)]
    pub ublk_dev_id: Option<u32>,
}

pub fn read_state(name: &str) -> Option<StateFile> {
    let text = std::fs::read_to_string(volumes_dir().join(format!("{name}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = std::io::pipe()?;
    Ok((OwnedFd::from(r), OwnedFd::from(w)))
}

/// Starts a worker for `dev`, hands it the key through a pipe and waits (up to `timeout`)
/// for the line with its block device.
pub fn spawn(
    exe: &Path,
    s: &VolumeSettings,
    dev: &Path,
    key: &VolumeKey,
    timeout: Duration,
) -> Result<PathBuf, String> {
    let (key_r, key_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let (ready_r, ready_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
    {
        // 64 bytes fit the pipe buffer: written before the child runs, then closed (EOF).
        let mut w = std::fs::File::from(key_w);
        w.write_all(key.expose())
            .map_err(|e| format!("writing the key pipe: {e}"))?;
    }
    let mut cmd = Command::new(exe);
    cmd.arg("worker")
        .arg(dev)
        .arg(&s.name)
        .arg("--transport")
        .arg(match s.transport {
            TransportKind::Auto => "auto",
            TransportKind::Ublk => "ublk",
            TransportKind::Fuse => "fuse",
        })
        .arg("--queue-depth")
        .arg(s.queue_depth.to_string())
        .arg("--key-fd")
        .arg(key_r.as_raw_fd().to_string())
        .arg("--ready-fd")
        .arg(ready_w.as_raw_fd().to_string())
        .stdin(Stdio::null())
        // Its own process group: a Ctrl-C at an interactive agent must not kill the worker.
        .process_group(0);
    if let Some(q) = s.queues {
        cmd.arg("--queues").arg(q.to_string());
    }
    if s.allow_discards {
        cmd.arg("--allow-discards");
    }
    if s.read_only {
        cmd.arg("--read-only");
    }
    let keep = [key_r.as_raw_fd(), ready_w.as_raw_fd()];
    // SAFETY: runs in the forked child before exec; fcntl is async-signal-safe and only
    // clears FD_CLOEXEC on the two pipe ends the child must inherit.
    unsafe {
        cmd.pre_exec(move || {
            for fd in keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {} worker: {e}", exe.display()))?;
    drop(key_r);
    drop(ready_w);
    // Reap the worker whenever it exits, so it never lingers as a zombie under the agent.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let mut r = BufReader::new(std::fs::File::from(ready_r));
        let res = r.read_line(&mut line).map(|_| line);
        let _ = tx.send(res);
    });
    let res = rx.recv_timeout(timeout);
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    match res {
        Ok(Ok(line)) if !line.trim().is_empty() => Ok(PathBuf::from(line.trim())),
        Ok(Ok(_)) => Err(format!(
            "worker (pid {pid}) exited before it was ready; see its log"
        )),
        Ok(Err(e)) => Err(format!("reading the worker's ready pipe: {e}")),
        Err(_) => Err(format!("worker (pid {pid}) not ready after {timeout:?}")),
    }
}

/// One JSON-line request to a worker; returns its JSON reply.
pub fn request(name: &str, op: &str, key: Option<&VolumeKey>) -> Result<serde_json::Value, String> {
    let path = volumes_dir().join(format!("{name}.sock"));
    let mut s =
        UnixStream::connect(&path).map_err(|e| format!("worker socket {}: {e}", path.display()))?;
    let t = Some(Duration::from_secs(30));
    s.set_read_timeout(t).map_err(|e| e.to_string())?;
    s.set_write_timeout(t).map_err(|e| e.to_string())?;
    let mut msg = format!("{{\"op\":\"{op}\"}}\n").into_bytes();
    if let Some(k) = key {
        // Written as one buffer; the copy is wiped right after.
        msg.extend_from_slice(k.expose());
    }
    let w = s.write_all(&msg);
    zeroize::Zeroize::zeroize(&mut msg);
    w.map_err(|e| format!("worker {name}: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&s)
        .read_line(&mut reply)
        .map_err(|e| format!("worker {name}: {e}"))?;
    if reply.trim().is_empty() {
        // `close` may end the worker before it answers.
        return if op == "close" {
            Ok(serde_json::Value::Null)
        } else {
            Err(format!("worker {name} closed the connection"))
        };
    }
    let v: serde_json::Value = serde_json::from_str(reply.trim())
        .map_err(|e| format!("worker {name}: bad reply {reply:?}: {e}"))?;
    if v.get("ok") == Some(&serde_json::Value::Bool(false))
        || v.get("error").is_some_and(|e| !e.is_null())
    {
        return Err(format!(
            "worker {name}: {}",
            v.get("error").or(v.get("message")).unwrap_or(&v)
        ));
    }
    Ok(v)
}

/// Does a status reply say the worker is suspended?
pub fn is_suspended(status: &serde_json::Value) -> bool {
    status.get("suspended").and_then(|v| v.as_bool()) == Some(true)
        || status.get("state").and_then(|v| v.as_str()) == Some("suspended")
}

/// Sends `close` and waits (bounded) for the worker to go away. A worker refuses `close`
/// while suspended or while its device is in use; with `force` it is then sent SIGTERM,
/// which makes it remove the device regardless (the contract's forced close).
pub fn close(name: &str, force: bool) -> Result<(), String> {
    let pid = read_state(name).and_then(|s| s.pid);
    let res = request(name, "close", None).map(|_| ());
    let res = match (res, force, pid) {
        (Err(e), true, Some(pid)) => {
            tracing::info!(volume = name, pid, reason = %e, "forcing the worker to close (SIGTERM)");
            // SAFETY: plain kill(2) on the pid the worker recorded in its own state file.
            if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
                return Err(format!(
                    "cannot signal worker {pid}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(())
        }
        (r, _, _) => r,
    };
    res?;
    if let Some(pid) = pid {
        for _ in 0..1500 {
            // SAFETY: kill with signal 0 only checks that the pid exists.
            if unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        return Err(format!("worker {pid} of {name} did not exit within 30 s"));
    }
    Ok(())
}

/// The volume whose worker serves `block_device` (for the udev naming rule).
pub fn name_of_block_device(block_device: &Path) -> Option<String> {
    let want = block_device
        .canonicalize()
        .unwrap_or_else(|_| block_device.to_owned());
    let rd = std::fs::read_dir(volumes_dir()).ok()?;
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let Some(name) = p.file_stem().and_then(|n| n.to_str()) else {
            continue;
        };
        if !super::config::valid_name(name) {
            continue;
        }
        if let Some(st) = read_state(name) {
            let bd = st.block_device.canonicalize().unwrap_or(st.block_device);
            if bd == want {
                return Some(name.to_owned());
            }
        }
    }
    None
}
