//! Operations on a running worker by volume name that take more than one control request:
//! a close that waits for the process to go away (optionally forced, for revocation), and the
//! reverse lookup from a served block device to its volume (the udev naming rule).

use std::path::Path;
use std::time::{Duration, Instant};

use super::{WorkerClient, WorkerError, list_states, read_state, sys};

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

/// The volume whose live worker serves `block_device` (`kvcrypt udev-name`).
pub fn name_of_block_device(block_device: &Path) -> Option<String> {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
    let want = canon(block_device);
    list_states()
        .into_iter()
        .find(|s| canon(&s.block_device) == want)
        .map(|s| s.name)
}
