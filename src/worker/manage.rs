//! Operations on a running worker by volume name that take more than one control request:
//! a close that waits for the process to go away (optionally forced, for revocation), and the
//! reverse lookup from a served block device to its volume (the udev naming rule).

use std::path::Path;
use std::time::{Duration, Instant};

use super::{WorkerClient, WorkerError, WorkerState, read_state, sys};

/// Sends `close` and waits up to `timeout` for the worker process to exit (`timeout` also
/// bounds the request itself). A worker refuses `close` while suspended or while its device
/// is in use; with `force` it is then sent SIGTERM, on which it removes the device regardless
/// (the contract's forced close).
pub fn close_and_wait(name: &str, force: bool, timeout: Duration) -> Result<(), WorkerError> {
    let pid = read_state(name).map(|s| s.pid);
    let res = WorkerClient::connect_timeout(name, timeout).and_then(|mut c| c.close());
    let res = match res {
        // `close` may end the worker before its answer is read: it is going away as asked.
        Err(WorkerError::Control { source, .. })
            if source.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            Ok(())
        }
        Err(e) if force => match pid {
            Some(pid) => {
                tracing::info!(volume = name, pid, reason = %e, "volume {name}: forcing worker {pid} to close with SIGTERM ({e})");
                sys::signal(pid, libc::SIGTERM).map_err(|e| {
                    WorkerError::State(format!("cannot signal worker {pid} of '{name}': {e}"))
                })
            }
            None => Err(e),
        },
        r => r,
    };
    res?;
    let Some(pid) = pid else { return Ok(()) };
    let deadline = Instant::now() + timeout;
    while sys::pid_alive(pid) {
        if Instant::now() >= deadline {
            return Err(WorkerError::State(format!(
                "worker {pid} of '{name}' did not exit within {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The volume whose worker serves `block_device` (`kvcrypt udev-name`): a live worker's, or a
/// dead worker's whose device is waiting for its replacement (see [`awaits_new_worker`]).
pub fn name_of_block_device(block_device: &Path) -> Option<String> {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
    let want = canon(block_device);
    let states = all_states();
    pick_name(
        &states,
        |s| canon(&s.block_device) == want,
        |s| super::pid_alive(s.pid) || awaits_new_worker(s),
    )
}

/// Of the state files naming the device (`names_it`), the one still serving it (`serves`).
fn pick_name(
    states: &[WorkerState],
    names_it: impl Fn(&WorkerState) -> bool,
    serves: impl Fn(&WorkerState) -> bool,
) -> Option<String> {
    states
        .iter()
        .filter(|s| names_it(s))
        .find(|s| serves(s))
        .map(|s| s.name.clone())
}

/// A dead worker's device that still carries the volume until a new worker takes it over: a
/// ublk device left QUIESCED (it exists as long as nobody deleted it), a FUSE loop device still
/// bound to the held connection (its label is the volume's). udev must keep naming it: when the
/// dead worker's last close of the loop device made udev re-run the rules, the link went away,
/// systemd stopped the mount bound to the device unit and mounted it again once the new worker
/// was in (seen in the system test) — the in-place recovery was wasted on a remount.
fn awaits_new_worker(s: &WorkerState) -> bool {
    match s.transport.as_str() {
        "ublk" => s.ublk_dev_id.is_some() && s.block_device.exists(),
        "fuse" => kvcrypt_datapath::transport::loopdev::label(&s.block_device)
            .ok()
            .flatten()
            .is_some_and(|l| l == kvcrypt_datapath::transport::fuse::loop_label(&s.name)),
        _ => false,
    }
}

/// Every state file, whether its worker lives or not.
fn all_states() -> Vec<WorkerState> {
    let Ok(dir) = std::fs::read_dir(super::volumes_dir()) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            super::read_state(n.strip_suffix(".json")?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(name: &str, pid: u32, dev: &str) -> WorkerState {
        WorkerState {
            pid,
            name: name.into(),
            device: "/dev/vdb".into(),
            transport: "fuse".into(),
            block_device: dev.into(),
            ublk_dev_id: None,
            uuid: String::new(),
            read_only: false,
            allow_discards: false,
            fuse_mode: None,
            fuse: None,
        }
    }

    #[test]
    fn a_dead_workers_device_keeps_its_name_while_it_awaits_a_new_worker() {
        let states = vec![st("old", 11, "/dev/loop3"), st("data", 12, "/dev/loop0")];
        let on = |d: &'static str| move |s: &WorkerState| s.block_device == Path::new(d);
        // Live worker.
        assert_eq!(
            pick_name(&states, on("/dev/loop0"), |s| s.pid == 12),
            Some("data".into())
        );
        // Dead, but its device waits for a new worker (what awaits_new_worker tells).
        assert_eq!(
            pick_name(&states, on("/dev/loop0"), |s| s.name == "data"),
            Some("data".into())
        );
        // Dead and gone: no name, the link goes.
        assert_eq!(pick_name(&states, on("/dev/loop0"), |_| false), None);
        // Another volume's device is never named after this one.
        assert_eq!(
            pick_name(&states, on("/dev/loop3"), |s| s.name == "data"),
            None
        );
    }

    #[test]
    fn a_loop_device_that_is_not_bound_does_not_await_a_worker() {
        // A path that is no loop device at all.
        let s = st("data", 1, "/dev/null");
        assert!(!awaits_new_worker(&s));
    }
}
