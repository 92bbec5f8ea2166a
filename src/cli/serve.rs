//! Serving commands: open, close, and the hidden per-volume worker. (Owned by the data-path work.)

use std::io::Read;
use std::path::Path;

use kvcrypt_datapath::transport::TransportKind;

use super::{CliError, CloseArgs, OpenArgs, WorkerArgs};
use crate::worker::{self, RunOptions, WorkerClient, WorkerError, WorkerSpec};
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_exit::{Context, Exit, Failure};
use kvcrypt_format::LoadedHeader;

/// `kvcrypt open DEVICE NAME`: unwrap the volume key through Key Vault, check it, serve the
/// device (detached worker, or in the foreground) and print the block device path.
pub fn open(config: &Path, a: OpenArgs) -> Result<(), Failure> {
    worker::validate_name(&a.name)?;
    if a.foreground && !a.no_access_checks {
        return Err(CliError::Usage(
            "--foreground serves without access checks (revoking the key would not lock the volume); \
             pass --no-access-checks as well to accept that, or leave out --foreground to hand the \
             volume to the agent"
                .into(),
        )
        .into());
    }
    if !a.no_access_checks {
        if a.allow_unpinned_key {
            // The agent trusts only the configuration's pins; a one-off waiver belongs to a
            // volume nobody else serves.
            return Err(CliError::Usage(
                "--allow-unpinned-key cannot be handed to the agent, which only unlocks keys \
                 pinned in the configuration: add the key to `keys` of [vault], or pass \
                 --no-access-checks as well to serve it from this command"
                    .into(),
            )
            .into());
        }
        return open_in_agent(&a);
    }
    let loaded = kvcrypt_header_io::read(&a.device)?;
    let key = unwrap_volume_key(config, &a.device, &loaded, a.allow_unpinned_key)?;
    // ublk: a worker that died (SIGKILL, crash) left its device QUIESCED with every request
    // held; re-attach that device (same /dev/ublkbN) instead of adding a new one.
    let recover_dev_id = stale_ublk_device(&a.name, &a.device, a.transport);
    if let Some(id) = recover_dev_id {
        tracing::info!(volume = %a.name, "volume {}: recovering /dev/ublkb{id} left by a dead worker", a.name);
    }
    let spec = WorkerSpec {
        transport: a.transport,
        queues: a.queues,
        queue_depth: a.queue_depth,
        allow_discards: a.allow_discards,
        read_only: a.read_only,
        recover_dev_id,
        ..WorkerSpec::new(&a.device, &a.name)
    };
    if a.foreground {
        let opts = spec.run_options();
        worker::ensure_dirs().context("creating /run/kvcrypt")?;
        if let Some(s) = worker::reap_stale(&a.name) {
            return Err(WorkerError::AlreadyOpen {
                name: s.name,
                pid: s.pid,
                block_device: s.block_device.display().to_string(),
            }
            .into());
        }
        let name = a.name.clone();
        return worker::run_worker(
            &opts,
            key,
            Box::new(move |bdev: &Path| {
                // As for a detached worker: print the device once udev has named it. On a
                // thread of its own: this process serves the device meanwhile (udev reads it).
                let bdev = bdev.to_owned();
                std::thread::spawn(move || {
                    worker::wait_until_named(&name, &bdev);
                    println!("{}", bdev.display());
                });
            }),
        );
    }
    let info = worker::spawn_worker(&spec, &key)?;
    drop(key);
    // Print the device only once it can be used by name (udev's /dev/disk/by-kvcrypt/NAME).
    worker::wait_until_named(&info.name, &info.block_device);
    println!("{}", info.block_device.display());
    Ok(())
}

/// `kvcrypt open` with access checks: the running agent unwraps the key, serves the volume
/// and re-checks access like a configured volume's (status, lock, revocation, close). This
/// process never holds the key. No agent: refused (NotFound) naming both ways out.
fn open_in_agent(a: &OpenArgs) -> Result<(), Failure> {
    use crate::agent::control::{self, ClientError, Request};
    use crate::agent::opened::{OPEN_TIMEOUT, OpenSpec};
    let device = std::path::absolute(&a.device)
        .with_context(|| format!("resolving {}", a.device.display()))?;
    let req = Request::Open(OpenSpec {
        name: a.name.clone(),
        device,
        transport: a.transport,
        queues: a.queues,
        queue_depth: a.queue_depth,
        allow_discards: a.allow_discards,
        read_only: a.read_only,
    });
    // The agent's own wait plus a margin for the answer.
    let timeout = OPEN_TIMEOUT + std::time::Duration::from_secs(20);
    match control::request(&control::socket_path(), &req, timeout) {
        Ok(r) => {
            let bd = r.volumes.first().and_then(|v| v.block_device.clone());
            match bd {
                Some(bd) => println!("{bd}"),
                None => println!("{}", r.message.unwrap_or_default()),
            }
            Ok(())
        }
        Err(ClientError::NotRunning(_)) => Err(CliError::NotFound(format!(
            "no agent running (no control socket at {}); start kvcrypt-agent.service, or pass \
             --no-access-checks to serve without revocation checks",
            control::socket_path().display()
        ))
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// The ublk device a dead worker of volume `name` left behind for `device`, if the kernel still
/// holds it for recovery (its own server pid is checked, so a live worker never matches).
fn stale_ublk_device(name: &str, device: &Path, transport: TransportKind) -> Option<u32> {
    if transport == TransportKind::Fuse {
        return None;
    }
    let s = worker::read_state(name)?;
    let same = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if s.transport != "ublk" || same(&s.device) != same(device) {
        return None;
    }
    s.ublk_dev_id
        .filter(|&id| kvcrypt_datapath::transport::ublk::is_recoverable(id))
}

/// Unwraps the VMK with the first pinned key slot that works and checks it against the
/// header. Slots naming a key `[vault] keys` does not pin are never tried (refused before any
/// request when none is pinned), and requests go to the pin's host.
fn unwrap_volume_key(
    config: &Path,
    device: &Path,
    loaded: &LoadedHeader,
    allow_unpinned: bool,
) -> Result<VolumeKey, Failure> {
    if loaded.slots.is_empty() {
        return Err(CliError::Config(format!("{} has no key slots", device.display())).into());
    }
    let cfg = super::volume::load_vault_config(config)?;
    let pins = super::pinning::cli_pins(&cfg, config, allow_unpinned);
    let provider = super::volume::vault_provider(&cfg)?;
    let (key, _slot) = super::volume::unlock_volume(&loaded.header, &provider, &pins)
        .with_context(|| format!("opening {}", device.display()))?;
    Ok(key)
}

/// `kvcrypt close NAME`: flush and remove the device; the worker exits.
pub fn close(a: CloseArgs) -> Result<(), Failure> {
    worker::validate_name(&a.name)?;
    // A volume the agent manages is closed by the agent, which then keeps it closed until
    // `kvcrypt unlock`; closing its worker behind the agent's back looked like a crash, and the
    // agent served it again at once. A runtime volume (`kvcrypt open` handed it to the
    // agent) is closed and forgotten there. Workers the agent does not know (`open
    // --no-access-checks`) and a machine without an agent are closed directly.
    use crate::agent::control::{self, ClientError, ErrorCode, Request};
    let req = Request::Close {
        name: a.name.clone(),
    };
    match control::request(
        &control::socket_path(),
        &req,
        std::time::Duration::from_secs(120),
    ) {
        Ok(r) => {
            println!("{}", r.message.unwrap_or_default());
            return Ok(());
        }
        Err(ClientError::NotRunning(_))
        | Err(ClientError::Refused {
            code: ErrorCode::NotFound,
            ..
        }) if !agent_manages(&a.name) => {}
        Err(e) => return Err(e.into()),
    }
    if worker::reap_stale(&a.name).is_none() {
        worker::unlink_by_name(&a.name);
        return Err(WorkerError::NotOpen(a.name).into());
    }
    let mut c = WorkerClient::connect(&a.name)?;
    c.close()?;
    Ok(())
}

/// `kvcrypt worker …` (hidden): read the key from the key fd, serve until closed.
pub fn worker(a: WorkerArgs) -> Result<(), Failure> {
    // Before the key exists in this process: no core dumps, no ptrace by non-root.
    kvcrypt_crypto::secmem::harden_process().context("hardening the worker process")?;
    let mut kf = worker::take_fd(a.key_fd).with_context(|| format!("key fd {}", a.key_fd))?;
    let mut key = VolumeKey::zeroed();
    kf.read_exact(key.expose_mut())
        .with_context(|| format!("reading the 64-byte volume key from fd {}", a.key_fd))?;
    drop(kf);
    let ready = match a.ready_fd {
        Some(fd) => Some(worker::take_fd(fd).with_context(|| format!("ready fd {fd}"))?),
        None => None,
    };
    let fuse_takeover = match (a.fuse_recover, a.fuse_init, a.fuse_fds) {
        (Some(loop_dev), Some(init), Some(n)) => {
            // Written by the agent from a dead worker's state file; not an operator's input.
            let init = serde_json::from_str(&init)
                .map_err(|e| Failure::wrap(Exit::Failure, e).context("--fuse-init"))?;
            let mut fds = Vec::with_capacity(n);
            for i in 0..n as i32 {
                let fd = worker::FUSE_FD_BASE + i;
                let f = worker::take_fd(fd).with_context(|| format!("/dev/fuse fd {fd}"))?;
                fds.push(std::sync::Arc::new(std::os::fd::OwnedFd::from(f)));
            }
            Some(worker::FuseTakeover {
                loop_dev,
                init,
                fds,
            })
        }
        _ => None,
    };
    let opts = RunOptions {
        device: a.device,
        name: a.name,
        transport: a.transport,
        queues: a.queues,
        queue_depth: a.queue_depth,
        allow_discards: a.allow_discards,
        read_only: a.read_only,
        recover_dev_id: a.recover_dev_id,
        fuse_takeover,
    };
    worker::run_worker(
        &opts,
        key,
        Box::new(move |bdev: &Path| {
            use std::io::Write;
            if let Some(mut f) = ready {
                let _ = writeln!(f, "{}", bdev.display());
            }
        }),
    )
}

/// Whether a running agent has `name` in its configuration (it answered "not open" rather than
/// "no volume named …").
fn agent_manages(name: &str) -> bool {
    use crate::agent::control::{self, Request};
    control::request(
        &control::socket_path(),
        &Request::Status {
            name: Some(name.to_owned()),
        },
        std::time::Duration::from_secs(10),
    )
    .is_ok()
}
